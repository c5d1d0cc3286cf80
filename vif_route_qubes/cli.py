"""The `vif-route-qubes` command line: thin click commands over vif.run_vif.

Xen's hotplug convention is honoured before click sees the arguments:
`key=value` arguments set variables exactly as the environment would.
"""

from vif_route_qubes import timing  # noqa: F401  (first: starts the benchmark's clock)

import os
import re
import sys

import click

from vif_route_qubes import __version__
from vif_route_qubes.options import Seconds, common_options, run_main

_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
EXIT_CODES = """Exit status: 0 success (also for add/remove of a vif and offline of a
vif that is gone), 1 failure, 2 usage error or refused input."""


def xen_assignments(argv: list[str]) -> list[str]:
    """Move `key=value` arguments into the environment; return the rest."""
    rest = []
    for arg in argv:
        match = _ASSIGNMENT.fullmatch(arg)
        if match and not arg.startswith("-"):
            os.environ[match.group(1)] = match.group(2)
        else:
            rest.append(arg)
    return rest


def _event_options(func):
    opts = [
        click.argument("vif", required=False, envvar="vif"),
        click.argument("addresses", nargs=-1),
        click.option("--mac", envvar="VIF_ROUTE_MAC", show_envvar=True,
                     help="Peer MAC for permanent neighbour entries [default: xenstore mac]."),
        click.option("--gateway", envvar="VIF_ROUTE_GATEWAY", show_envvar=True,
                     help="IPv4 gateway put on the vif as /32 [default: qubesdb /qubes-netvm-gateway]."),
        click.option("--gateway6", envvar="VIF_ROUTE_GATEWAY6", show_envvar=True,
                     help="IPv6 gateway put on the vif as /128 [default: qubesdb /qubes-netvm-gateway6]."),
        click.option("--dns1", envvar="VIF_ROUTE_DNS1", show_envvar=True,
                     help="Virtual DNS 1 [default: qubesdb /qubes-netvm-primary-dns]."),
        click.option("--dns2", envvar="VIF_ROUTE_DNS2", show_envvar=True,
                     help="Virtual DNS 2 [default: qubesdb /qubes-netvm-secondary-dns]."),
        click.option("--harden/--no-harden", default=None, envvar="VIF_ROUTE_HARDEN", show_envvar=True,
                     help="Hardening sysctls on the vif [default: qubesdb "
                          "/qubes-service/harden-network-interfaces non-empty]."),
        click.option("--hooks-dir", default="/rw/config/network-hooks.d", show_default=True,
                     envvar="VIF_ROUTE_HOOKS_DIR", show_envvar=True,
                     help="Every executable file here runs as HOOK online|offline VIF TYPE [ADDR]."),
        click.option("--hook-timeout", type=Seconds(0.1), default=10.0, show_default=True,
                     envvar="VIF_ROUTE_HOOK_TIMEOUT", show_envvar=True,
                     help="Seconds before a hook is killed (it is logged, never fatal)."),
        click.option("--visible-ip", envvar="VIF_ROUTE_VISIBLE_IP", show_envvar=True,
                     help="Address the VM sees instead of its real one [default: qubesdb "
                          "/mapped-ip/IP4/visible-ip]."),
        click.option("--visible-gateway", envvar="VIF_ROUTE_VISIBLE_GATEWAY", show_envvar=True,
                     help="Gateway the mapped VM sees [default: qubesdb /mapped-ip/IP4/visible-gateway]."),
        click.option("--mapped-wait", type=Seconds(), default=5.0, show_default=True,
                     envvar="VIF_ROUTE_MAPPED_WAIT", show_envvar=True,
                     help="Seconds to wait for mapped entries qubesdb announced but does not hold yet."),
        click.option("--netns-prefix", default="", envvar="VIF_ROUTE_NETNS_PREFIX", show_envvar=True,
                     help="Prefix of the namespace a mapped vif gets (its name is PREFIX + VIF)."),
        click.option("--type-if", type=click.Choice(["vif", "tap"]), default="vif", show_default=True,
                     envvar="type_if", show_envvar=True, help="Xen device kind (Xen passes type_if=...)."),
        click.option("--xenbus-path", envvar="XENBUS_PATH", show_envvar=True,
                     help="xenstore backend path of the vif; inputs are read and status written there."),
        common_options,
    ]
    for decorator in reversed(opts):
        func = decorator(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES,
             no_args_is_help=False, invoke_without_command=False)
@click.version_option(__version__, prog_name="vif-route-qubes")
def cli():
    """Configure routed networking for a Xen vif in a network-providing VM.

    \b
    Xen hotplug:  vif-route-qubes online type_if=vif   (env vif, XENBUS_PATH)
    By hand:      vif-route-qubes online vif37.0 10.137.7.27 [ADDRESS...]
    """


def _run_event(command: str, params: dict) -> None:
    from vif_route_qubes import logsetup, sources
    from vif_route_qubes.errors import VifError
    from vif_route_qubes.inputs import VifArgs
    from vif_route_qubes.vif import RunOptions, effective_command, report_error, run_vif

    log = logsetup.setup(params["verbose"])
    sources.set_timeout(params["tool_timeout"])
    action = effective_command(command, params["type_if"])
    if action is None:
        log.debug("%s for type_if=%s: nothing to do", command, params["type_if"])
        return
    env_ip = os.environ.get("ip")
    addresses = params["addresses"] or (tuple(env_ip.split()) if env_ip is not None and env_ip.strip() else None)
    args = VifArgs(command=action, vif=params["vif"], addresses=addresses, mac=params["mac"],
                   gateway=params["gateway"], gateway6=params["gateway6"], dns1=params["dns1"],
                   dns2=params["dns2"], harden=params["harden"], type_if=params["type_if"],
                   xenbus_path=params["xenbus_path"], hooks_dir=params["hooks_dir"],
                   hook_timeout=params["hook_timeout"], visible_ip=params["visible_ip"],
                   visible_gateway=params["visible_gateway"], mapped_wait=params["mapped_wait"],
                   netns_prefix=params["netns_prefix"])
    opts = RunOptions(dry_run=params["dry_run"], backend=params["backend"],
                      lock_file=params["lock_file"], lock_timeout=params["lock_timeout"])
    try:
        run_vif(args, opts, sys.stdout)
    except VifError as exc:
        from vif_route_qubes.parse import shown

        vif = shown(params["vif"]) if params["vif"] else ""
        message = str(exc) if vif and str(exc).startswith(vif) else f"{action} {vif}".rstrip() + f": {exc}"
        log.error("%s", message)
        if not opts.dry_run:
            from vif_route_qubes.parse import xenbus_path_ok

            if params["xenbus_path"] and xenbus_path_ok(params["xenbus_path"]):
                report_error(params["xenbus_path"], message)
        sys.exit(exc.exit_code)


def _event_command(name: str, help_text: str):
    @cli.command(name, help=help_text, epilog=EXIT_CODES)
    @_event_options
    def command(**params):
        _run_event(name, params)

    return command


_event_command("online", "Configure the vif: anti-spoofing, routes, gateway, proxy ARP/NDP, neighbours, hooks.")
_event_command("offline", "Undo everything online did for the vif; exit 0 if the vif is already gone.")
_event_command("add", "Xen's add event: configures a tap device (type_if=tap), a no-op for a vif.")
_event_command("remove", "Xen's remove event: unconfigures a tap device (type_if=tap), a no-op for a vif.")


@cli.command("init", epilog=EXIT_CODES)
@click.option("--gateway6", envvar="VIF_ROUTE_GATEWAY6", show_envvar=True,
              help="Route IPv6 for the VMs [default: when qubesdb has /qubes-netvm-gateway6].")
@common_options
def init_command(gateway6, dry_run, verbose, backend, lock_file, lock_timeout, tool_timeout):
    """Install the base ruleset of a network-providing VM and turn on forwarding.

    Idempotent: a second run changes nothing, and the rules of vifs already
    online and the DNS rules are kept.
    """
    from vif_route_qubes import logsetup
    from vif_route_qubes.errors import VifError
    from vif_route_qubes.init import read_init_inputs, run_init

    log = logsetup.setup(verbose)
    from vif_route_qubes import sources

    sources.set_timeout(tool_timeout)
    try:
        from vif_route_qubes import backend as backends

        run_init(read_init_inputs(gateway6), backends.resolve(backend), dry_run, lock_file, lock_timeout,
                 sys.stdout)
    except VifError as exc:
        log.error("init: %s", exc)
        sys.exit(exc.exit_code)


@cli.command("check", epilog="""Exit status: 0 all as it should be, 1 differences (one line each on
stdout) or the system could not be read (one line on stderr), 2 usage error,
refused input or nft backend.""")
@click.option("--all", "every", is_flag=True,
              help="Every vif: interfaces vifD.N and every vif with rules of ours (stale ones too).")
@click.option("--json", "as_json", is_flag=True, help='Print a list of {"vif"|"scope", "kind", "detail"}.')
@_event_options
def check_command(every, as_json, **params):
    """Compare the system with what online would leave (read-only): one vif, or --all.

    Same inputs as online (env vif, XENBUS_PATH, xenstore, qubesdb, options).
    """
    from vif_route_qubes.check import run_vif_check

    sys.exit(run_vif_check(params, every, as_json))


def main() -> None:
    run_main(cli, xen_assignments(sys.argv[1:]), "vif-route-qubes")
