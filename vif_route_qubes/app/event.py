"""An event command (online, offline, add, remove) from click's values."""

import os
import sys


def run_event(command: str, params: dict) -> None:
    """Run it; a failure is one line on stderr (and syslog, and xenstore) and
    SystemExit with the error's exit status."""
    from vif_route_qubes import logsetup
    from vif_route_qubes.app.vif import effective_command, report_error, run_vif
    from vif_route_qubes.cli.optspec import RunOptions
    from vif_route_qubes.errors import VifError
    from vif_route_qubes.inputs import sources
    from vif_route_qubes.inputs.read import VifArgs

    # udev runs RUN programs with the event's variables only: no PATH, and Python's
    # fallback (/bin:/usr/bin) misses the sbin tools.
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    opts = RunOptions.from_params(params)
    log = logsetup.setup(opts.verbose)
    sources.set_timeout(opts.tool_timeout)
    action = effective_command(command, params["type_if"])
    if action is None:
        log.debug("%s for type_if=%s: nothing to do", command, params["type_if"])
        return
    env_ip = os.environ.get("ip")
    addresses = params["addresses"] or (tuple(env_ip.split()) if env_ip is not None and env_ip.strip() else None)
    args = VifArgs.from_params(params, command=action, addresses=addresses)
    try:
        run_vif(args, opts, sys.stdout)
    except VifError as exc:
        from vif_route_qubes.inputs.parse import shown

        vif = shown(args.vif) if args.vif else ""
        message = str(exc) if vif and str(exc).startswith(vif) else f"{action} {vif}".rstrip() + f": {exc}"
        log.error("%s", message)
        if not opts.dry_run:
            from vif_route_qubes.inputs.parse import xenbus_path_ok

            # Only the vif's own backend path: another one may be another VM's device.
            if args.xenbus_path and args.vif and xenbus_path_ok(args.xenbus_path, args.vif):
                report_error(args.xenbus_path, message)
        sys.exit(exc.exit_code)
