"""An event command (online, offline, add, remove) from click's values."""

import os
import sys

from vif_route_qubes import logsetup
from vif_route_qubes.app import vif
from vif_route_qubes.errors import VifError
from vif_route_qubes.inputs.parse import shown, xenbus_path_ok
from vif_route_qubes.inputs.read import given_addresses
from vif_route_qubes.optspec import RunOptions, VifArgs
from vif_route_qubes.system import sources


def run_event(command: str, params: dict) -> None:
    """Run it; a failure is one line on stderr (and syslog, and xenstore) and
    SystemExit with the error's exit status."""
    # udev runs RUN programs with the event's variables only: no PATH, and Python's
    # fallback (/bin:/usr/bin) misses the sbin tools.
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    opts = RunOptions.from_params(params)
    log = logsetup.setup(opts.verbose)
    sources.set_timeout(opts.tool_timeout)
    action = vif.effective_command(command, params["type_if"])
    if action is None:
        log.debug("%s for type_if=%s: nothing to do", command, params["type_if"])
        return
    args = VifArgs.from_params(params, command=action, addresses=given_addresses(params["addresses"]))
    try:
        vif.run_vif(args, opts, sys.stdout)
    except VifError as exc:
        name = shown(args.vif) if args.vif else ""
        message = str(exc) if name and str(exc).startswith(name) else f"{action} {name}".rstrip() + f": {exc}"
        log.error("%s", message)
        if not opts.dry_run:
            # Only the vif's own backend path: another one may be another VM's device.
            if args.xenbus_path and args.vif and xenbus_path_ok(args.xenbus_path, args.vif):
                vif.report_error(args.xenbus_path, message)
        sys.exit(exc.exit_code)
