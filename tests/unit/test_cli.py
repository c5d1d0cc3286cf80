"""The command lines of both programs, through their real main() in-process (click
parses them all; CONTRACT section 1 "How it is invoked" and "Errors").

The code that acts (run_vif, run_init, run_dns, the vif check) is replaced by a
recorder, and any fork is an error, so nothing here touches the system: what is
checked is what main() hands over, what a user sees on stdout and stderr, and
the exit status.
"""

import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import subprocess
import sys
from typing import NamedTuple

import pytest

from setup_dnat_to_ns import cli as dns_cli, run as dns_run
from vif_route_qubes.check import drift as check
from vif_route_qubes import optspec
from vif_route_qubes.cli import main as vif_cli
from vif_route_qubes.app import init, vif
from vif_route_qubes.cli.main import xen_assignments

PATH = "/local/domain/0/backend/vif/37/0"
VIF_PROG, DNS_PROG = "vif-route-qubes", "qubes-setup-dnat-to-ns"
ENV_NAMES = {o.envvar for o in optspec.EVENT + optspec.INIT + optspec.DNS + optspec.ARGS if o.envvar} | {"ip"}


class Run(NamedTuple):
    """One main() call: exit status, stdout, stderr and what reached the code that acts."""

    code: object
    out: str
    err: str
    calls: list

    @property
    def lines(self):
        return self.err.splitlines()


@pytest.fixture
def cmd(monkeypatch):
    calls = []
    monkeypatch.setattr(vif, "run_vif", lambda args, opts, out: calls.append(("vif", args, opts)) or 0)
    monkeypatch.setattr(init, "run_init", lambda inp, firewall, *rest: calls.append(("init", inp, firewall, rest)))
    monkeypatch.setattr(init, "read_init_inputs", lambda gateway6: init.InitInputs(ipv6=bool(gateway6)))
    monkeypatch.setattr(vif.backend, "resolve", lambda choice: f"resolved {choice}")
    monkeypatch.setattr(dns_run, "run_dns", lambda params: calls.append(("dns", params)) or 0)
    monkeypatch.setattr(check, "run_vif_check", lambda params, every, as_json: calls.append(("check", params)) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"a fork: {a[:1]}"))
    saved_env, root = dict(os.environ), logging.getLogger()
    saved_log = root.handlers[:], root.level

    def run(argv, env=(), prog=None):
        """main() with sys.argv = [prog, *argv] and only `env` of our variables."""
        for name in ENV_NAMES & set(os.environ):
            del os.environ[name]
        os.environ.update({"VIF_ROUTE_SYSLOG": "/nonexistent/syslog", **dict(env)})
        main = dns_cli.main if prog == DNS_PROG else vif_cli.main
        monkeypatch.setattr(sys, "argv", [prog or VIF_PROG, *argv])
        calls.clear()
        handlers = root.handlers[:]  # main() sets up logging afresh: pytest's handlers back after
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = "returned"  # main() always ends with SystemExit
            except SystemExit as exc:
                code = exc.code
        root.handlers[:] = handlers
        return Run(code, out.getvalue(), err.getvalue(), list(calls))

    yield run
    os.environ.clear()  # as before the test, also what key=value arguments set
    os.environ.update(saved_env)
    root.handlers[:] = saved_log[0]
    root.setLevel(saved_log[1])


def only_vif_call(result):
    assert result.code == 0, result.err
    [(kind, args, opts)] = result.calls
    assert kind == "vif"
    return args, opts


# -- Xen's key=value arguments ----------------------------------------------------------

def test_key_value_arguments_become_environment_variables(cmd):
    argv = ["online", "type_if=tap", "vif=vif38.0", "ip=10.137.7.5 10.137.7.6", "_x=", "--mac=00:16:3e:5e:6c:19",
            "-v", "-x=y", "1a=b", "a-b=c", "\u00e9=x", "=v", "vif37.0"]
    assert xen_assignments(argv) == ["online", "--mac=00:16:3e:5e:6c:19", "-v", "-x=y", "1a=b", "a-b=c", "\u00e9=x",
                                     "=v", "vif37.0"]
    assert (os.environ["type_if"], os.environ["vif"], os.environ["ip"], os.environ["_x"]) == \
        ("tap", "vif38.0", "10.137.7.5 10.137.7.6", "")


def test_hotplug_form_is_the_manual_form(cmd):
    hotplug = only_vif_call(cmd(["online", "type_if=vif"], {"vif": "vif37.0", "XENBUS_PATH": PATH}))
    by_hand = only_vif_call(cmd(["online", "vif37.0", "--xenbus-path", PATH, "--type-if", "vif"]))
    as_args = only_vif_call(cmd(["online", f"XENBUS_PATH={PATH}", "vif=vif37.0", "type_if=vif"]))
    assert hotplug == by_hand == as_args
    args, opts = hotplug
    assert (args.command, args.vif, args.xenbus_path, args.addresses) == ("online", "vif37.0", PATH, None)
    assert opts == optspec.RunOptions()  # every default as the table says
    offline, _ = only_vif_call(cmd(["offline", "type_if=vif"], {"vif": "vif37.0", "XENBUS_PATH": PATH}))
    assert offline == dataclasses.replace(args, command="offline")


def test_tap_devices_act_on_add_and_remove(cmd):
    for argv, command in ((["add", "type_if=tap"], "online"), (["remove", "--type-if", "tap"], "offline")):
        args, _ = only_vif_call(cmd([*argv, "vif37.0-emu"]))
        assert args.command == command and args.type_if == "tap"
    for argv in (["add", "type_if=vif"], ["remove", "vif37.0"], ["online", "type_if=tap"]):
        result = cmd(argv, {"vif": "vif37.0"})
        assert (result.code, result.calls, result.err) == (0, [], "")


# -- values: command line, environment, defaults ----------------------------------------

def test_manual_invocation_values(cmd):
    args, opts = only_vif_call(cmd(
        ["online", "vif37.0", "10.137.7.27", "fd09:24ef:4179::a89:71b", "--mac", "00:16:3e:5e:6c:19", "--gateway",
         "10.137.7.1", "--gateway6", "", "--no-harden", "--backend=nft", "-v", "--hook-timeout", "2",
         "--lock-timeout=0", "--netns-prefix", "p-"]))
    assert args.addresses == ("10.137.7.27", "fd09:24ef:4179::a89:71b")
    assert (args.mac, args.gateway, args.gateway6, args.harden) == ("00:16:3e:5e:6c:19", "10.137.7.1", "", False)
    assert (args.hook_timeout, args.netns_prefix, args.hooks_dir) == (2.0, "p-", "/rw/config/network-hooks.d")
    assert (opts.backend, opts.verbose, opts.lock_timeout, opts.dry_run) == ("nft", True, 0.0, False)


def test_environment_values(cmd):
    env = {"VIF_ROUTE_DRY_RUN": "1", "QUBES_NET_BACKEND": "iptables", "VIF_ROUTE_HARDEN": "1",
           "VIF_ROUTE_LOCK_TIMEOUT": "2.5", "VIF_ROUTE_LOCK_FILE": "/tmp/l", "VIF_ROUTE_MAC": "",
           "VIF_ROUTE_MAPPED_WAIT": "86400", "ip": "10.137.7.5 10.137.7.6", "vif": "vif37.0"}
    args, opts = only_vif_call(cmd(["online"], env))
    assert (args.harden, args.mac, args.mapped_wait, args.addresses) == (True, None, 86400.0,
                                                                         ("10.137.7.5", "10.137.7.6"))
    assert opts == optspec.RunOptions(dry_run=True, backend="iptables", lock_file="/tmp/l", lock_timeout=2.5)
    # The command line wins over the environment, positional addresses over `ip`; a blank `ip` is none.
    args, opts = only_vif_call(cmd(["online", "vif38.0", "10.137.7.9", "--backend", "nft"], env))
    assert (args.vif, args.addresses, opts.backend) == ("vif38.0", ("10.137.7.9",), "nft")
    args, _ = only_vif_call(cmd(["online"], {"vif": "vif37.0", "ip": "  "}))
    assert args.addresses is None


def test_init_and_dns_values(cmd):
    [(kind, inp, firewall, rest)] = cmd(["init", "--gateway6", "fd09::1", "--dry-run"]).calls
    assert (kind, inp.ipv6, firewall, rest[:1]) == ("init", True, "resolved auto", (True,))
    result = cmd(["eth0", "dhcp4-change"], {"QUBES_NET_BACKEND": "nft", "VIF_ROUTE_DNS1": "10.139.1.1"}, DNS_PROG)
    [(kind, params)] = result.calls
    assert (result.code, params["iface"], params["action"], params["backend"], params["dns1"]) == \
        (0, "eth0", "dhcp4-change", "nft", "10.139.1.1")
    assert (params["resolv_conf"], params["check"], params["lock_timeout"]) == ("/etc/resolv.conf", False, 60.0)


# -- usage errors: one line on stderr, exit 2, nothing run --------------------------------

USAGE_ERRORS = [
    ([], {}), (["frob"], {}), (["explode", "vif37.0"], {}), (["online", "--mac"], {}),
    (["online", "--dry-run=1"], {}), (["online", "--backend", "bogus"], {}), (["online", "--type-if", "x"], {}),
    (["online", "--bogus"], {}), (["online", "-x"], {}), (["init", "vif1.0"], {}), (["init", "--mac", "x"], {}),
    (["check", "--frob"], {}), (["online", "--mapped-wait", "\x1b[2J\n2"], {}), (["online"], {"type_if": "bogus"}),
    (["online", "type_if=bogus"], {}), (["online"], {"QUBES_NET_BACKEND": "x"}),
    (["online", "VIF_ROUTE_DRY_RUN=maybe"], {}),
]
SECONDS_REFUSED = ["nan", "inf", "-inf", "1e999", "-1", "86400.5", "x", "", "0x10"]


@pytest.mark.parametrize("argv, env", USAGE_ERRORS + [
    (["online", f"--{name}-timeout", value], {}) for name in ("lock", "tool", "hook") for value in SECONDS_REFUSED
] + [(["online", "--hook-timeout", "0.05"], {}), (["online", "--tool-timeout=0.09"], {}),
     (["online"], {"VIF_ROUTE_LOCK_TIMEOUT": "inf"}), (["init"], {"VIF_ROUTE_TOOL_TIMEOUT": "0"})])
def test_usage_error_is_one_line_and_exit_2(cmd, argv, env):
    result = cmd(argv, env)
    assert (result.code, result.calls, result.out) == (2, [], "")
    [line] = result.lines
    assert line.startswith("vif-route-qubes: ") and line.endswith("(see vif-route-qubes --help)")
    assert "\x1b" not in line  # control characters of the input are escaped


@pytest.mark.parametrize("argv, env", [(["eth0"], {}), (["a", "b", "c"], {}), (["--frob"], {}), (["--check=1"], {}),
                                       (["--lock-timeout", "nan"], {}), ([], {"VIF_ROUTE_TOOL_TIMEOUT": "0"}),
                                       (["--backend", "x"], {})])
def test_dns_usage_error_is_one_line_and_exit_2(cmd, argv, env):
    result = cmd(argv, env, DNS_PROG)
    assert (result.code, result.calls) == (2, [])
    [line] = result.lines
    assert line.startswith(f"{DNS_PROG}: ") and line.endswith(f"(see {DNS_PROG} --help)")


def test_seconds_accepted_from_0_or_the_minimum_to_a_day(cmd):
    _, opts = only_vif_call(cmd(["online", "vif37.0", "--lock-timeout", "0", "--tool-timeout", "0.1"]))
    assert (opts.lock_timeout, opts.tool_timeout) == (0.0, 0.1)
    args, _ = only_vif_call(cmd(["online", "vif37.0", "--hook-timeout", "86400", "--mapped-wait", "1e1"]))
    assert (args.hook_timeout, args.mapped_wait) == (86400.0, 10.0)


def test_script_to_a_reader_gone_is_status_120(cmd, monkeypatch, capfd):
    # `vif-route-qubes online --dry-run | head -0`: as the interpreter's status, without its message at exit.
    monkeypatch.setattr(vif, "run_vif", lambda args, opts, out: out.write("#!/bin/sh\n") and 0)
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd([])  # our variables cleared (restored after the test)
    with open(write_end, "w") as gone, contextlib.redirect_stdout(gone):
        monkeypatch.setattr(sys, "argv", [VIF_PROG, "online", "vif37.0", "--dry-run"])
        with pytest.raises(SystemExit) as exit_:
            vif_cli.main()
    assert exit_.value.code == 120
    assert capfd.readouterr().err == ""


# -- --help and --version ---------------------------------------------------------------

@pytest.mark.parametrize("argv, prog, table", [
    (["online", "--help"], VIF_PROG, optspec.EVENT), (["check", "-h"], VIF_PROG, optspec.EVENT),
    (["init", "--help"], VIF_PROG, optspec.INIT), (["--help"], DNS_PROG, optspec.DNS)])
def test_help_shows_every_option_and_its_variable(cmd, argv, prog, table):
    result = cmd(argv, prog=prog)
    assert (result.code, result.err, result.calls) == (0, "", [])
    text = " ".join(result.out.split())  # click wraps lines
    for opt in table:
        assert all(flag in text for flag in opt.flags) and f"env var: {opt.envvar}" in text, opt.dest
    assert "Exit status: 0" in text


def test_version(cmd):
    for prog, argv in ((VIF_PROG, ["--version"]), (DNS_PROG, ["--version"])):
        result = cmd(argv, prog=prog)
        assert (result.code, result.out, result.err) == (0, f"{prog}, version 0.1.0\n", "")
    result = cmd(["--help"])
    assert result.code == 0 and all(f"  {name} " in result.out for name in
                                    ("online", "offline", "add", "remove", "init", "check"))


# -- main() runs again, and in a forked child: nothing fixed at import time --------------

def test_each_run_has_its_own_options_and_logging(cmd):
    # -v logs the no-op's debug line; the next run, without -v, must not.
    first = cmd(["add", "type_if=vif", "-v"], {"vif": "vif37.0"})
    assert (first.code, first.lines) == (0, ["vif-route-qubes: add for type_if=vif: nothing to do"])
    second = cmd(["add", "type_if=vif"], {"vif": "vif37.0"})
    assert (second.code, second.err) == (0, "")
    args, opts = only_vif_call(cmd(["online", "vif37.0"]))
    assert opts == optspec.RunOptions() and args.type_if == "vif"


def test_main_in_a_forked_child_logs_with_its_own_pid(cmd, tmp_path):
    cmd([])  # our variables cleared (restored after the test)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "log"))
    listener.settimeout(5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as the command server's, with the modules already imported
        status = 1
        try:
            os.environ.update(vif="vif37.0", VIF_ROUTE_SYSLOG=str(tmp_path / "log"))
            sys.argv = [VIF_PROG, "add", "type_if=vif", "--verbose"]
            try:
                vif_cli.main()
            except SystemExit as exc:
                os.write(write_end, json.dumps([exc.code, os.getpid()]).encode())
                status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        code, child = json.loads(pipe.read() or "[null, null]")
    try:
        datagram = listener.recv(4096).decode()
    finally:
        listener.close()
    assert (os.waitstatus_to_exitcode(status), code, child) == (0, 0, pid)
    # <31> = daemon (3) * 8 + debug (7): -v sends debug records to syslog as well.
    assert datagram == f"<31>vif-route-qubes[{pid}]: add for type_if=vif: nothing to do"
