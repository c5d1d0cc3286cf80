"""The click commands of `vif-route-qubes`; their options are the rows of optspec.py."""

import sys

import click

from vif_route_qubes import __version__
from vif_route_qubes.cli.options import options_of
from vif_route_qubes.cli.optspec import ARGS, EVENT, INIT, RunOptions

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
        from vif_route_qubes.app.event import run_event

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
    from vif_route_qubes import logsetup
    from vif_route_qubes.app.init import read_init_inputs, run_init
    from vif_route_qubes.errors import VifError
    from vif_route_qubes.inputs import sources
    from vif_route_qubes.system import backend as backends

    opts = RunOptions.from_params(params)
    log = logsetup.setup(opts.verbose)
    sources.set_timeout(opts.tool_timeout)
    try:
        run_init(read_init_inputs(params["gateway6"]), backends.resolve(opts.backend), opts.dry_run, opts.lock_file,
                 opts.lock_timeout, sys.stdout)
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
    from vif_route_qubes.check.drift import run_vif_check

    sys.exit(run_vif_check(params, every, as_json))
import vif_route_qubes.server.command  # noqa: E402,F401  (registers `serve`; last: it imports cli)
