"""An event command (online, offline, add, remove) from parsed option values:
the same for the fast path and for click."""

import os
import sys


def run_event(command: str, params: dict) -> None:
    """Run it; a failure is one line on stderr (and syslog, and xenstore) and
    SystemExit with the error's exit status."""
    from vif_route_qubes import logsetup, sources
    from vif_route_qubes.errors import VifError
    from vif_route_qubes.inputs import VifArgs
    from vif_route_qubes.vif import RunOptions, effective_command, report_error, run_vif

    # udev runs RUN programs with the event's variables only: no PATH, and Python's
    # fallback (/bin:/usr/bin) misses the sbin tools.
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
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

            # Only the vif's own backend path: another one may be another VM's device.
            if params["xenbus_path"] and params["vif"] and xenbus_path_ok(params["xenbus_path"], params["vif"]):
                report_error(params["xenbus_path"], message)
        sys.exit(exc.exit_code)
