"""click's side of the option table (optspec.py): option decorators shared by
the commands of both programs, and how a click command is run."""

import click

from vif_route_qubes.optspec import MAX_SECONDS, Opt, seconds_ok


class Seconds(click.ParamType):
    """A finite number of seconds, 0 (or `low`) to a day: nan and inf are refused."""

    name = "seconds"

    def __init__(self, low: float = 0.0) -> None:
        self.low = low

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not seconds_ok(number, self.low):
            self.fail(f"{value!r} is not between {self.low:g} and {MAX_SECONDS:g} seconds", param, ctx)
        return number


def click_option(opt: Opt):
    """The click.option for one row of the table."""
    kwargs = {"envvar": opt.envvar, "show_envvar": bool(opt.envvar), "help": opt.help,
              "show_default": opt.show_default}
    if opt.default is not None:
        kwargs["default"] = opt.default
    if opt.kind == "flag":
        return click.option(*opt.flags, opt.dest, is_flag=True, **kwargs)
    if opt.kind == "switch":  # no default: None means "ask qubesdb"
        return click.option("/".join(opt.flags), opt.dest, default=None, **kwargs)
    if opt.kind == "choice":
        kwargs["type"] = click.Choice(list(opt.choices))
    elif opt.kind == "seconds":
        kwargs["type"] = Seconds(opt.low)
    return click.option(*opt.flags, opt.dest, **kwargs)


def options_of(specs: tuple[Opt, ...]):
    """A decorator adding every option of the table, in its order."""

    def apply(func):
        for opt in reversed(specs):
            func = click_option(opt)(func)
        return func

    return apply


def one_line(text: str) -> str:
    """A message as one printable line: control characters (from untrusted
    arguments) are escaped, never written raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_main(command: click.Command, args: list[str], prog_name: str) -> None:
    """Run a click command; a usage error is one line on stderr and exit 2."""
    if not args and isinstance(command, click.Group):
        click.echo(f"{prog_name}: missing command (see {prog_name} --help)", err=True)
        raise SystemExit(2)
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())} (see {prog_name} --help)", err=True)
        raise SystemExit(2) from None
    except click.ClickException as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        raise SystemExit(1) from None
    raise SystemExit(status if isinstance(status, int) else 0)
