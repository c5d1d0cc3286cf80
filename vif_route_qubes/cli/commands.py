"""The click commands of `vif-route-qubes`; their options are the rows of optspec.py.

Each command imports the layers below it when it runs (app, check, the
server): `--help`, `--version` and a usage error load neither pyroute2 nor sh.
"""

import sys

import click

from vif_route_qubes import __version__
from vif_route_qubes.cli.options import Seconds, options_of
from vif_route_qubes.optspec import ARGS, EVENT, INIT, RunOptions
from vif_route_qubes.server.protocol import DEFAULT_SOCKET

EXIT_CODES = """Exit status: 0 success (also for add/remove of a vif and offline of a
vif that is gone), 1 failure, 2 usage error or refused input."""


_event_options = options_of(ARGS + EVENT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES,
             no_args_is_help=False, invoke_without_command=False)
@click.version_option(__version__, prog_name="vif-route-qubes")
def cli():
    """Configure routed networking for a Xen vif in a network-providing VM.

    \b
    Xen hotplug:  vif-route-qubes online type_if=vif   (env vif, XENBUS_PATH)
    By hand:      vif-route-qubes online vif37.0 10.137.7.27 [ADDRESS...]
    """


def _event_command(name: str, help_text: str):
    @cli.command(name, help=help_text, epilog=EXIT_CODES)
    @_event_options
    def command(**params):
        from vif_route_qubes.app.event import run_event  # start-up: pyroute2 and sh only when an event runs

        run_event(name, params)

    return command


_event_command("online", "Configure the vif: anti-spoofing, routes, gateway, proxy ARP/NDP, neighbours, hooks.")
_event_command("offline", "Undo everything online did for the vif; exit 0 if the vif is already gone.")
_event_command("add", "Xen's add event: configures a tap device (type_if=tap), a no-op for a vif.")
_event_command("remove", "Xen's remove event: unconfigures a tap device (type_if=tap), a no-op for a vif.")


@cli.command("init", epilog=EXIT_CODES)
@options_of(INIT)
def init_command(**params):
    """Install the base ruleset of a network-providing VM and turn on forwarding.

    Idempotent: a second run changes nothing, and the rules of vifs already
    online and the DNS rules are kept.
    """
    from vif_route_qubes.app.init import run_init_command  # start-up: pyroute2 and sh only when it runs

    run_init_command(RunOptions.from_params(params), params["gateway6"])


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
    from vif_route_qubes.check.drift import run_vif_check  # start-up: pyroute2 and sh only when it runs

    sys.exit(run_vif_check(params, every, as_json))


@cli.command("serve")
@click.option("--socket", "socket_path", envvar="VIF_ROUTE_SERVER_SOCKET", show_envvar=True,
              default=DEFAULT_SOCKET, show_default=True,
              help="Listen here (mode 0600) unless systemd passes a socket (LISTEN_FDS).")
@click.option("--idle-timeout", type=Seconds(0.0), default=None, show_default="none: resident",
              help="Exit after this many seconds without a request (running events finish first); "
                   "systemd starts the server again for the next event.")
@click.option("--spare/--no-spare", "spare", default=True, show_default=True,
              help="Keep one child forked ahead, its memory already its own, for the next "
                   "request: a faster event, for about 30 MB while it waits.")
@click.option("--spare-idle", type=Seconds(0.0), default=30.0, show_default=True,
              help="Drop the spare after this many seconds without a request; the next "
                   "request makes it again.")
def serve(socket_path, idle_timeout, spare, spare_idle):
    """Serve events: the engine loaded once, a child forked per event.

    The commands' entry points offer each event here first and run it
    themselves when no server takes it.  Every event is logged on stderr
    ("served ... by child N"); `-v` of an event says "served by
    vif-route-qubes server pid N".  Resident unless --idle-timeout; the spare
    child goes after --spare-idle seconds without a request, so a quiet server
    holds only its own memory.
    """
    from vif_route_qubes.server.serve import serve as run  # start-up: an event never loads the server's loop

    run(socket_path, idle_timeout, spare, spare_idle)
