"""Strategies, judges and the in-process sandbox of tests/netns/test_fuzz.py (hostile input)."""

import contextlib
import functools
import io
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from vif_route_qubes.system import apply, lock
from vif_route_qubes.cli import main as vif_cli
from vif_route_qubes.app import init, vif
from vif_route_qubes.facts import ipt_state
from vif_route_qubes import logsetup
from vif_route_qubes.system import sources
from vif_route_qubes.model import VifFacts
from vif_route_qubes.system import tools

PATH = "/local/domain/0/backend/vif/37/0"
XS_GOOD = {"ip": "10.137.7.27 fd09:24ef:4179::a89:71b", "mac": "00:16:3e:5e:6c:19", "type": "vif"}
QDB = ("/qubes-netvm-gateway", "/qubes-netvm-gateway6", "/qubes-netvm-primary-dns",
       "/qubes-netvm-secondary-dns", "/qubes-service/harden-network-interfaces")
QDB_GOOD = dict(zip(QDB, ("10.137.7.1", "fd09:24ef:4179::1", "10.139.1.1", "10.139.1.2", "1")))
MAPPED = {"/mapped-ip/10.137.7.27": "", "/mapped-ip/10.137.7.27/visible-ip": "10.137.0.99",
          "/mapped-ip/10.137.7.27/visible-gateway": "10.137.0.1"}
GOOD_TEXTS = [*XS_GOOD.values(), *QDB_GOOD.values(), *MAPPED.values(), "192.0.2.53"]
FIXED = {ipaddress.ip_address("fe80::")}  # the IPv6 anti-spoofing lets neighbour discovery through
VIF_RE = r"vif(0|[1-9]\d*)\.(0|[1-9]\d*)(-emu)?"
STRICT = {"vif": VIF_RE, "rename_from": VIF_RE, "mac": r"[0-9a-f]{2}(:[0-9a-f]{2}){5}",
          "dev_type": r"[a-z][a-z0-9_-]{0,15}", "xenbus_path": r"(/local/domain/\d+/)?backend/vif/\d+/\d+",
          "netns_prefix": r"[A-Za-z0-9_.-]{0,32}"}
SHELL_SAFE = set("\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:/-_+=*[]!<>|&'\"#,")
DATA_SAFE = SHELL_SAFE | set("{};@\t")  # iptables-restore / nft input in a quoted here-document

# -- strategies: valid values, the same with something hostile spliced in, and noise --

NASTY = [";", "|", "&&", "$(reboot)", "`id`", "\n", "\r", "\t", " ", "\x0b", "'", '"', "\\", "../", "%eth0",
         "/32", "-", "--help", "*", "{a,b}", "!", "#", "\u200b", "\xa0", "\u0661", "\uff11", "\u212a", "::",
         "..", "0x1", "010", "\x7f", "\u202e", "\udcff", "=", "\x1b[2J"]
v4, v6 = st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)
addr = st.one_of(v4, v6, st.builds("10.137.{}.{}".format, st.integers(0, 255), st.integers(0, 255)))


def hostile(valid, alphabet="0123456789abcdefABCDEF.:"):
    spliced = st.tuples(valid, st.sampled_from(NASTY), st.integers(0, 40)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    noise = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=50)
    return st.one_of(valid, spliced, noise, st.text(alphabet, max_size=45), st.sampled_from(NASTY))


def injected(valid):
    """A value carrying another key's line: qubesdb-read -f prints `KEY = value` lines, raw."""
    return st.builds(lambda v, k, a: f"{v}\n{k} = {a}", valid, st.sampled_from(QDB), addr)


ip_list = hostile(st.lists(addr, min_size=1, max_size=3).map(" ".join))
mac = hostile(st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)))
vifname = hostile(st.builds("vif{}.{}{}".format, st.integers(0, 40000), st.integers(0, 20),
                            st.sampled_from(["", "", "-emu"])), "vif0123456789.-emu")
dev_type = hostile(st.from_regex(r"\A[a-z][a-z0-9_-]{0,17}\Z"), "abcdefghijklmnopqrstuvwxyz0123456789_-")
xenbus = hostile(st.builds("/local/domain/{}/backend/vif/{}/{}".format, st.integers(0, 3), st.integers(0, 40000),
                           st.integers(0, 9)), "/localdomainbackendvif0123456789.")
QDB_VALUES = {QDB[0]: hostile(v4) | injected(v4), QDB[1]: hostile(v6) | injected(v6),
              QDB[2]: hostile(v4) | injected(v4), QDB[3]: hostile(v4), QDB[4]: hostile(st.sampled_from(["", "1"]))}
VALUE_INPUTS = {**{f"xenstore {k}": s for k, s in (("ip", ip_list), ("mac", mac), ("vifname", vifname),
                                                    ("type", dev_type))},
                **{f"qubesdb {k}": s for k, s in QDB_VALUES.items()},
                **{f"qubesdb {k}": hostile(v4) for k in list(MAPPED)[1:]}}
ENV_INPUTS = {"vif": vifname, "ip": ip_list, "XENBUS_PATH": xenbus,
              "type_if": hostile(st.sampled_from(["vif", "tap"]), "viftap")}
VIF_WORDS = ["online", "offline", "add", "remove", "init", "vif37.0", "vif37.0-emu", "10.137.7.27", "fd09::27",
             "--mac", "--gateway", "--gateway6", "--dns1", "--dns2", "--harden", "--no-harden", "--hooks-dir",
             "--hook-timeout", "--type-if", "--xenbus-path", "--dry-run", "-v", "--backend", "nft", "auto",
             "--lock-timeout", "--visible-ip", "--visible-gateway", "--netns-prefix", "--help", "--version", "-h",
             "--", "-", "type_if=tap", "vif=vif38.0", "ip=10.137.7.5 10.137.7.6", f"XENBUS_PATH={PATH}", "=",
             "1", "-1", "nan", "inf", "1e999"]
argv_words = st.lists(st.one_of(st.sampled_from(VIF_WORDS), ip_list, mac, vifname), max_size=8)

resolv_line = st.one_of(st.builds("nameserver {}".format, addr), st.sampled_from(
    ["nameserver 127.0.0.53", "nameserver 0.0.0.0", "nameserver 224.0.0.1", "# nameserver 192.0.2.9",
     "nameserver 192.0.2.1 # x", "nameserver\t198.51.100.7", "search example.org", "options edns0"]))
resolv_conf = hostile(st.lists(resolv_line, max_size=8).map("\n".join), "nameserver 0123456789.:#;\n\t")
byte = st.one_of(st.integers(0, 255), st.integers(), st.booleans(), st.floats(), st.text(max_size=3))
entry = st.one_of(st.tuples(st.integers(0, 3), st.sampled_from([2, 10]),
                            st.lists(st.integers(0, 255), min_size=4, max_size=4)).map(list),
                  st.lists(st.one_of(byte, st.lists(byte, max_size=5)), max_size=4))
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)
resolved_reply = st.one_of(
    st.lists(entry, max_size=4).map(lambda e: json.dumps({"type": "a(iiay)", "data": e})),
    json_value.map(json.dumps), st.text(max_size=60),
    st.sampled_from(["", "{", "[" * 5000, '{"data": ' + "[" * 5000 + "]" * 5000 + "}", "NaN", '{"data": NaN}']))
DNS_WORDS = ["eth0", "up", "vpn-up", "vpn-down", "dhcp4-change", "down", "--dns1", "--dns2", "10.139.1.1",
             "--resolv-conf", "/nonexistent", "--dry-run", "-v", "--backend", "nft", "--help", "--", ""]
DNS_INPUTS = {  # each case: (argv, qubesdb DNS values, resolv.conf, resolved's reply)
    "dns qubesdb": st.tuples(QDB_VALUES[QDB[2]], QDB_VALUES[QDB[3]]).map(lambda v: ([], v, None, None)),
    "dns argv": st.lists(st.one_of(st.sampled_from(DNS_WORDS), hostile(v4)), max_size=6).map(
        lambda v: (v, (), None, None)),
    "resolv.conf": resolv_conf.map(lambda v: ([], (), v, None)),
    "resolved reply": resolved_reply.map(lambda v: ([], (), "nameserver 127.0.0.53\n", v)),
}

# -- judges ------------------------------------------------------------------------------

ADDRESS_TOKEN = re.compile(r"(?<![\w.:])[0-9A-Fa-f]*[.:][0-9A-Fa-f.:]*")
HERE_DOC = re.compile(r"<<'(\w+)'\n")


@functools.lru_cache(maxsize=1 << 16)
def as_address(token):
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(token)


def addresses_in(texts):
    """Every address any supplied text holds (any word, any separator)."""
    return {a for text in texts for word in re.split(r"[^0-9A-Fa-f.:]+", text or "") if (a := as_address(word))}


def check_text(text, shell, what):
    """Characters the templates use: shell, or data for a tool (a here-document not fed to sh)."""
    match = HERE_DOC.search(text)
    head, safe = (text[:match.start()] if match else text), SHELL_SAFE if shell else DATA_SAFE
    bad = set(head.replace("$$", "")) - safe  # `$$` (the shell's pid) is the one `$` templates use
    assert not bad, f"{what}: characters {bad} in:\n{head}"
    if match:
        body, _, rest = text[match.end():].partition(f"\n{match.group(1)}\n")
        check_text(body, shell and head.rstrip().endswith("sh -e"), what)
        check_text(rest, shell, what)


def check_script(script, allowed, what):
    """Only supplied addresses, and only characters the templates themselves use."""
    check_text(script, True, what)
    for token in set(ADDRESS_TOKEN.findall(script)):
        address = as_address(token)
        assert address is None or address in allowed, f"{what}: {token} was never supplied:\n{script}"


def resolved_addresses(reply):
    """The addresses a resolved reply spells as 4 (IPv4) or 16 (IPv6) integers 0..255."""
    found = []

    def walk(node):
        if (isinstance(node, list) and len(node) in (4, 16)
                and all(type(b) is int and 0 <= b <= 255 for b in node)):
            found.append(str(ipaddress.ip_address(bytes(node))))
        for item in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            walk(item)

    with contextlib.suppress(ValueError, RecursionError):
        walk(json.loads(reply))
    return " ".join(found)


def check_servers(servers, source):
    """What the pure parsers return: distinct unicast addresses of the source, 16 at most per family."""
    assert len(servers) == len(set(servers))
    assert all(sum(a.version == v for a in servers) <= 16 for v in (4, 6)), servers
    assert all(not (a.is_multicast or a.is_unspecified or (a.version == 4 and a.is_reserved))
               and a in addresses_in([source]) for a in servers), servers


# -- the tools and the sandbox -----------------------------------------------------------

def fake_tool(store):
    """xenstore-read, xenstore-write and qubesdb-read as CONTRACT section 6 describes them."""
    def run(argv, timeout=None):
        name, args, out, err, status = argv[0], list(argv[1:]), "", "", 0
        if name == "xenstore-read":
            for path in args:
                if path not in store:
                    return tools.Result(1, out, f"xenstore-read: couldn't read path {path}\n")
                out += store[path] + "\n"
        elif name == "qubesdb-read":
            for path in (a for a in args if not a.startswith("-")):
                if path in store:
                    out += (f"{path} = " if "-f" in args else "") + store[path] + "\n"
                else:
                    err += "" if "-q" in args else f"Failed to read {path}\n"
                    status = 2
        elif name != "xenstore-write":
            raise AssertionError(f"unexpected program {argv}")
        return tools.Result(status, out, err)
    return run


class StrictSyslog(logging.Handler):
    """Stands in for the product's syslog handler: encodes each record strictly
    as UTF-8 and sends it nowhere, so a message that got past the product's
    filter with a raw non-UTF-8 byte prints a logging traceback."""

    def __init__(self, ident, path):
        super().__init__()

    def emit(self, record):
        try:
            record.getMessage().encode("utf-8")
        except Exception:  # noqa: BLE001  (what logging.Handler.emit does)
            self.handleError(record)


class Recorder:
    """Stands in for the applier: records the batches, applies nothing."""
    scripts: list = []

    def __init__(self, lock_fd=None, ipsets=None):
        self.timings = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run(self, batch):
        Recorder.scripts.append(batch.render())


def forbid_fork(*args, **kwargs):
    raise AssertionError(f"a fork during in-process fuzzing: {args[:1]}")


def facts(inp, *args, **kwargs):
    """What read_facts would find: the vif there, IPv6 on, no rules, no mapped namespace."""
    from vif_route_qubes.plan.mapped import MappedFacts

    extra = {"mapped": MappedFacts(False, False)} if "mapped" in VifFacts._fields else {}
    if "ipt" in VifFacts._fields:  # the ipset layout: no set, no rule yet
        from vif_route_qubes.plan import antispoof_ipt
        from vif_route_qubes.plan.ipt_text import EMPTY_TABLE
        from vif_route_qubes.plan.elements import Held
        from vif_route_qubes.system.ipset import SetInfo

        extra["ipt"] = antispoof_ipt.IptFacts({name: SetInfo() for name in antispoof_ipt.SET_NAMES},
                                              {4: Held(), 6: Held()}, {4: EMPTY_TABLE, 6: EMPTY_TABLE})
    return VifFacts(exists=True, rename_pending=inp.rename_from is not None, ipv6_enabled=True, **extra)


class Sandbox:
    """Both programs' main(), in-process, with every boundary to the system replaced."""

    def __init__(self, monkeypatch, hooks_dir, tmp_path):
        self.store, self.reply, self.conf = {}, "", None
        monkeypatch.setattr(sources, "_run", fake_tool(self.store))
        monkeypatch.setattr(vif, "read_facts", facts)
        monkeypatch.setattr(vif.backend, "resolve", lambda choice, wait_base=None: "iptables")
        for module in (vif, lock):
            monkeypatch.setattr(module, "locked", lambda *a, **k: contextlib.nullcontext())
        monkeypatch.setattr(apply, "Applier", Recorder)
        monkeypatch.setattr(ipt_state, "save", lambda family, table_name=None: "")
        monkeypatch.setattr(init, "run_init", lambda *a, **k: 0)
        # As if /dev/log were there: records go through StrictSyslog.
        monkeypatch.setattr(logsetup, "_Syslog", StrictSyslog)
        # Every program goes through system.tools: busctl answers with the reply, any other is refused.
        monkeypatch.setattr(tools, "run", lambda argv, **k: (tools.Result(0, self.reply, "") if argv[0] == "busctl"
                                                             else forbid_fork(argv)))
        monkeypatch.setattr(subprocess, "Popen", forbid_fork)  # the safety net: nothing forks here
        # On tmpfs when there is one: a file write on ext4 costs more than the rest of a case.
        self.folder = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path)
        self.env = {"vif": "vif37.0", "XENBUS_PATH": PATH, "VIF_ROUTE_HOOKS_DIR": hooks_dir,
                    "QUBES_RESOLV_CONF": f"{self.folder}/resolv.conf", "QUBES_FIREWALL_FLAG": f"{self.folder}/no"}

    def run(self, main, argv, env=(), values=(), conf="nameserver 192.0.2.53\n", reply=""):
        """A program's real main(): (exit status, stdout, stderr, batches it would apply)."""
        self.store.clear()
        self.store.update({f"{PATH}/{k}": v for k, v in XS_GOOD.items()} | QDB_GOOD | dict(values))
        if conf != self.conf:
            Path(self.env["QUBES_RESOLV_CONF"]).write_text(conf, errors="surrogateescape")
            self.conf = conf
        self.reply = reply
        saved_env, saved_argv, root = dict(os.environ), sys.argv, logging.getLogger()
        saved_log = (root.handlers[:], root.level)
        Recorder.scripts, out, err = [], io.StringIO(), io.StringIO()
        try:
            for name in [n for n in os.environ if n.startswith(("VIF_ROUTE_", "QUBES_", "XENBUS", "FAKE_"))
                         or n in ("vif", "ip", "type_if")]:
                del os.environ[name]
            os.environ.update({**self.env, **dict(env)})
            sys.argv = ["vif-route-qubes" if main is vif_cli.main else "qubes-setup-dnat-to-ns", *argv]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            for name in set(os.environ) - set(saved_env):
                del os.environ[name]
            os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
            sys.argv, root.handlers[:] = saved_argv, saved_log[0]
            root.setLevel(saved_log[1])
        return code, out.getvalue(), err.getvalue(), list(Recorder.scripts)
