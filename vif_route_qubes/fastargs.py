"""The usual invocations, parsed without click.

Xen's `online type_if=vif`, the manual `online vif37.0 10.137.7.27 --mac ...`,
NetworkManager's `IFACE ACTION`: these read long options, flags and
environment variables from the option table (optspec.py) and give the same
values click would.  Anything this does not understand for certain (help,
version, `--`, short clusters, a repeated option, a value click would refuse,
a flag set from the environment) returns None, and click handles it, errors
included.  tests/test_fastargs.py checks the two agree.
"""

from vif_route_qubes.optspec import Opt, seconds_ok


def _convert(opt: Opt, text: str):
    """The value click would give for `text`, or None when unsure."""
    if opt.kind == "str":
        return text
    if opt.kind == "choice":
        return text if text in opt.choices else None
    if opt.kind == "seconds":
        try:
            number = float(text)
        except ValueError:
            return None
        return number if seconds_ok(number, opt.low) else None
    return None


def _from_env(opt: Opt, environ) -> tuple[bool, object]:
    """(understood, value) for an option not given on the command line."""
    text = environ.get(opt.envvar) if opt.envvar else None
    if not text:  # click treats an empty variable as unset
        return True, opt.default
    if opt.kind in ("flag", "switch"):
        return False, None
    value = _convert(opt, text)
    return value is not None, value


def parse(specs: tuple[Opt, ...], argv: list[str], environ) -> tuple[dict, list[str]] | None:
    """(option values by dest, positional arguments), or None to leave it to click."""
    by_flag = {}
    for opt in specs:
        for flag in opt.flags:
            by_flag[flag] = opt
    given: dict[str, object] = {}
    positional: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        name, eq, inline = arg.partition("=")
        opt = by_flag.get(name)
        if opt is None or opt.dest in given:
            return None
        if opt.kind == "flag" or opt.kind == "switch":
            if eq:
                return None
            given[opt.dest] = opt.kind == "flag" or name == opt.flags[0]
            continue
        text = inline if eq else next(args, None)
        if text is None or (not eq and text.startswith("-")):
            return None
        value = _convert(opt, text)
        if value is None:
            return None
        given[opt.dest] = value
    values = {}
    for opt in specs:
        if opt.dest in given:
            values[opt.dest] = given[opt.dest]
            continue
        understood, value = _from_env(opt, environ)
        if not understood:
            return None
        values[opt.dest] = value
    return values, positional


def parse_event(argv: list[str], environ) -> tuple[str, dict] | None:
    """`COMMAND [VIF [ADDRESS...]] [OPTIONS]` of vif-route-qubes, for the
    event commands; None for anything else."""
    from vif_route_qubes.optspec import EVENT

    if not argv or argv[0] not in ("online", "offline", "add", "remove"):
        return None
    parsed = parse(EVENT, argv[1:], environ)
    if parsed is None:
        return None
    values, positional = parsed
    values["vif"] = positional[0] if positional else (environ.get("vif") or None)
    values["addresses"] = tuple(positional[1:])
    return argv[0], values


def parse_dns(argv: list[str], environ) -> dict | None:
    """`[IFACE ACTION] [OPTIONS]` of qubes-setup-dnat-to-ns; None for anything else."""
    from vif_route_qubes.optspec import DNS

    parsed = parse(DNS, argv, environ)
    if parsed is None:
        return None
    values, positional = parsed
    if len(positional) not in (0, 2):
        return None
    values["iface"], values["action"] = positional if positional else (None, None)
    return values
