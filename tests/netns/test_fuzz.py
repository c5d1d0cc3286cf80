"""Hostile input (issue "Faults, hostile input"; CONTRACT section 1, "Inputs" and "Errors").

Every text that comes from outside gets 2,000 hypothesis cases: xenstore `ip`, `mac`,
`vifname`, `type`; every qubesdb value (gateway, gateway6, DNS 1 and 2, hardening,
mapped visible address and gateway); the environment (`vif`, `ip`, XENBUS_PATH,
`type_if`); both programs' command lines; resolv.conf; systemd-resolved's reply; and
what the xenstore and qubesdb tools print.  None may escape as a traceback, end with
a status other than 0/1/2 (100 for the DNS command), fail with more than one line on
stderr, or render a script with anything but parsed values: each address in it one
that was supplied, each other field in its strict form, no character the templates
do not use (so no shell metacharacter from the input).

For speed the inputs run in-process, with every boundary to the system replaced
(tools, rule reading, lock, applier; a fork is an error: tests/kit/faults_fuzzkit.py),
so nothing here can change the machine.  A smaller sample goes through the real
commands with --dry-run in one namespace, and the first refused cases also run
for real, with a state hash before and after.
"""

import hashlib
import itertools
import re
import shutil
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults_fuzzkit import (DNS_INPUTS, ENV_INPUTS, FIXED, GOOD_TEXTS, MAPPED, PATH, QDB, QDB_GOOD, STRICT,
                            VALUE_INPUTS, XS_GOOD, Sandbox, addr, addresses_in, argv_words, check_script,
                            check_servers, fake_tool, hostile, injected, resolved_addresses)
from netns import BIN, RUN_PREFIX, run_cmd, state_of
from setup_dnat_to_ns import cli as dns_cli, resolvers
from vif_route_qubes.cli import main as vif_cli
from vif_route_qubes.plan import nft, vif as plan_vif
from vif_route_qubes.system import sources
from vif_route_qubes.errors import InputError, VifError
from vif_route_qubes.inputs.read import read_vif_inputs
from vif_route_qubes.optspec import VifArgs
from vif_route_qubes.model import VifFacts

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
REAL = settings(FUZZ, max_examples=200)


def run_cases(name, strategy, one, config=FUZZ):
    """The generated cases of one input; their number is printed for the report."""
    seen = []

    @config
    @given(strategy)
    def case(value):
        seen.append(1)
        one(value)

    case()
    print(f"\n{name}: {len(seen)} cases")
    assert len(seen) >= config.max_examples


def judge(result, supplied, codes, what):
    """Exit status, one line on stderr for a failure, nothing applied when refused,
    and every script (applied or printed by --dry-run) made of parsed values only."""
    code, out, err, scripts = result
    assert code in codes and "Traceback" not in err, f"{what}: exit {code}\n{err}"
    if code not in (0, 100):
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"{what}: exit {code} wants one line on stderr:\n{err}"
        assert scripts == [], f"{what}: refused, yet a batch was applied"
    for script in scripts + ([out] if out.startswith("#!/bin/sh") else []):
        check_script(script, addresses_in(supplied) | FIXED, what)


@pytest.fixture(scope="module")
def hooks_dir(tmp_path_factory):
    """One executable hook, so that hook lines (vif, type, address) are rendered too."""
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "hook").write_text("#!/bin/sh\nexit 0\n")
    (folder / "hook").chmod(0o755)
    return str(folder)


@pytest.fixture
def sandbox(monkeypatch, hooks_dir, tmp_path):
    made = Sandbox(monkeypatch, hooks_dir, tmp_path)
    yield made
    shutil.rmtree(made.folder)


# -- 1. xenstore and qubesdb values, through read_vif_inputs and the planner ------------

VARIANTS = itertools.cycle([(ipv6, backend, netns) for backend in ("iptables", "nft") for ipv6 in (True, False)
                            for netns in (False, True)])


def check_plans(inp, allowed, what):
    """Every text field in its strict form; online and offline rendered for one variant
    (IPv6 on/off, backend, a mapped vif's namespace there or not) in turn."""
    for field, pattern in STRICT.items():
        value = getattr(inp, field, None)
        assert value is None or re.fullmatch(pattern, value, re.ASCII), f"{what}: {field} {value!r}"
    ipv6, backend, netns = next(VARIANTS)
    extra = {}
    if "mapped" in VifFacts._fields:
        from vif_route_qubes.plan.mapped import MappedFacts

        extra["mapped"] = MappedFacts(netns, netns)
    if "ipt" in VifFacts._fields:
        from faults_fuzzkit import facts as empty_facts

        extra["ipt"] = empty_facts(inp).ipt
    facts = VifFacts(exists=True, rename_pending=inp.rename_from is not None, ipv6_enabled=ipv6,
                     backend=backend, nft=nft.NftState({}), **extra)
    for batch in (plan_vif.plan_online(inp, facts), plan_vif.plan_offline(inp._replace(command="offline"), facts)):
        check_script(batch.render(), allowed, what)


@pytest.mark.parametrize("name", list(VALUE_INPUTS))
def test_xenstore_and_qubesdb_values(name, monkeypatch, hooks_dir):
    key = name.split()[1]
    store = {}
    monkeypatch.setattr(sources, "xenstore_read", lambda paths: {p: store[p] for p in paths if p in store})
    monkeypatch.setattr(sources, "qubesdb_read", lambda keys: {k: store[k] for k in keys if k in store})

    def one(value):
        store.clear()
        store.update({f"{PATH}/{k}": v for k, v in XS_GOOD.items()} | QDB_GOOD)
        if key in MAPPED:  # a mapped VM: all three entries there, one of them hostile
            store.update(MAPPED)
        store[key if key.startswith("/") else f"{PATH}/{key}"] = value
        try:
            inp = read_vif_inputs(VifArgs("online", vif="vif37.0", xenbus_path=PATH, hooks_dir=hooks_dir))
        except InputError as exc:  # refused: exit 2, one line
            assert "\n" not in str(exc)
            return
        check_plans(inp, addresses_in(store.values()) | FIXED, f"{name}={value!r}")

    run_cases(name, VALUE_INPUTS[name], one)


# -- 2. what the tools print: a value never lands under another key ----------------------

@pytest.mark.parametrize("tool", ["qubesdb-read", "xenstore-read"])
def test_tool_output_never_mixes_keys(tool, monkeypatch):
    store = {}
    monkeypatch.setattr(sources, "_run", fake_tool(store))
    keys = list(QDB) if tool == "qubesdb-read" else [f"{PATH}/{k}" for k in ("ip", "mac", "type", "vifname")]
    # xenstore-read escapes control characters in what it prints: no newline there.
    value = hostile(addr) | injected(addr) if tool == "qubesdb-read" else hostile(addr).filter(lambda v: "\n" not in v)

    def one(values):
        store.clear()
        store.update({k: v for k, v in zip(keys, values) if v is not None})
        try:
            got = (sources.qubesdb_read if tool == "qubesdb-read" else sources.xenstore_read)(keys)
        except VifError as exc:
            assert "\n" not in str(exc)
            return
        assert got == store, f"{tool}: values read back under the wrong keys"

    run_cases(f"{tool} output", st.lists(st.none() | value, min_size=len(keys), max_size=len(keys)), one)


# -- 3. vif-route-qubes: environment and command line, through main() in-process ---------

@pytest.mark.parametrize("name", [f"env {n}" for n in ENV_INPUTS] + ["vif-route-qubes argv"])
def test_vif_route_qubes_environment_and_command_line(name, sandbox):
    if name.startswith("env "):  # the variable with each command, with or without --dry-run
        strategy = st.tuples(st.sampled_from(["online", "offline", "add", "remove"]), ENV_INPUTS[name[4:]],
                             st.booleans()).map(lambda t: ([t[0], "--dry-run"][:1 + t[2]], {name[4:]: t[1]}, [t[1]]))
    else:
        strategy = argv_words.map(lambda words: (words, {}, words))

    def one(case):
        argv, env, supplied = case
        result = sandbox.run(vif_cli.main, argv, env)
        judge(result, [*supplied, *GOOD_TEXTS, "10.137.7.5 10.137.7.6"], (0, 1, 2), f"{name} {argv!r} {env!r}")

    run_cases(name, strategy, one)


# -- 4. qubes-setup-dnat-to-ns: qubesdb, command line, resolv.conf, resolved's reply -----

@pytest.mark.parametrize("name", list(DNS_INPUTS))
def test_dns_command_inputs(name, sandbox):
    def one(case):
        argv, dns, conf, reply = case
        if name == "resolv.conf":  # the pure parsers first, then the whole command
            check_servers(resolvers.parse_resolv_conf(conf), conf)
        if name == "resolved reply":
            check_servers(resolvers.parse_resolved_dns(reply), resolved_addresses(reply))
        result = sandbox.run(dns_cli.main, argv, (), dict(zip(QDB[2:4], dns)), conf or "nameserver 192.0.2.53\n",
                             reply or "")
        supplied = [*dns, *GOOD_TEXTS, *argv, conf, resolved_addresses(reply or "")]
        judge(result, supplied, (0, 1, 2, 100), f"{name} {case!r}")

    run_cases(name, DNS_INPUTS[name], one)


# -- 5. a sample through the real commands (--dry-run), in one namespace ------------------

def put(folder, key, value):
    """A key of the file-backed xenstore/qubesdb stand-ins (tests/kit/fakebin), any text."""
    (folder / quote(key, safe="")).write_text(value, errors="surrogateescape")


def fresh(xen, qubesdb=()):
    for folder in (xen.xenstore, xen.qubesdb):
        shutil.rmtree(folder)
        folder.mkdir()
    for key, text in XS_GOOD.items():
        put(xen.xenstore, f"{PATH}/{key}", text)
    for key, text in (QDB_GOOD | dict(qubesdb)).items():
        put(xen.qubesdb, key, text)


def check_real(ns, argv, env, supplied, codes, what, refused, limit):
    """Exit status, stderr and the dry-run script; the first refused cases also run
    without --dry-run: refused again, with the same state hash before and after."""
    result = run_cmd(ns, argv, env, timeout=60)
    judge((result.returncode, result.stdout, result.stderr, []), supplied, codes, what)
    if result.returncode in (0, 100) or len(refused) >= limit:
        return
    refused.append(what)
    before = hashlib.sha256(state_of(ns).encode()).digest()
    again = run_cmd(ns, [word for word in argv if word != "--dry-run"], env, timeout=60)
    assert again.returncode == result.returncode, f"{what}: refused only with --dry-run: {again.stderr}"
    assert hashlib.sha256(state_of(ns).encode()).digest() == before, f"{what}: refused, yet the system changed"


def test_real_vif_route_qubes_sample(netns, xen, vifcmd):
    ns = netns.make("fuzz")
    ns.sh("for t in iptables ip6tables; do $t -t raw -N PRIME && $t -t raw -X PRIME; done"
          " && ip link add vif37.0 address fe:ff:ff:ff:ff:ff type veth peer name vm37")
    # xenstore-read escapes control characters in what it prints: no newline there.
    inputs = {n: s.filter(lambda v: "\n" not in v) if n.startswith("xenstore") else s for n, s in VALUE_INPUTS.items()}
    inputs |= {f"env {n}": s for n, s in ENV_INPUTS.items()} | {"argv": argv_words}
    refused = []

    def one(case):
        name, value = case
        key = name[len("qubesdb "):] if name.startswith("qubesdb ") else None
        fresh(xen, (MAPPED if key in MAPPED else {}) | ({key: value} if key else {}))
        if name.startswith("xenstore "):
            put(xen.xenstore, f"{PATH}/{name[9:]}", value)
        # Our prefix for a mapped vif's namespace: were one made, it would be recognisably ours.
        env = xen.env(vif="vif37.0", XENBUS_PATH=PATH, QUBES_NET_BACKEND="iptables",
                      VIF_ROUTE_NETNS_PREFIX=f"{RUN_PREFIX}-")
        env.update({name[4:]: value} if name.startswith("env ") else {})
        argv = [vifcmd, "online", "--dry-run", *(value if name == "argv" else ())]
        supplied = [value if isinstance(value, str) else " ".join(value), *GOOD_TEXTS, "10.137.7.5 10.137.7.6"]
        check_real(ns, argv, env, supplied, (0, 1, 2), f"{name} {value!r}", refused, 12)

    run_cases("vif-route-qubes, real command", st.sampled_from(sorted(inputs)).flatmap(
        lambda n: st.tuples(st.just(n), inputs[n])), one, REAL)
    print(f"{len(refused)} refused cases also run for real")


def test_real_dns_command_sample(netns, xen, tmp_path):
    ns = netns.make("fuzzdns")
    ns.sh("for t in nat mangle; do iptables -t $t -N PRIME && iptables -t $t -X PRIME; done")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busctl").write_text('#!/bin/sh\ncat "$FUZZ_REPLY"\n')  # systemd-resolved's answer
    (tmp_path / "bin" / "busctl").chmod(0o755)
    conf, reply = tmp_path / "resolv.conf", tmp_path / "reply.json"
    env = xen.env(PATH=f"{tmp_path / 'bin'}:{xen.env()['PATH']}", QUBES_RESOLV_CONF=str(conf),
                  FUZZ_REPLY=str(reply), QUBES_FIREWALL_FLAG=str(tmp_path / "no"), QUBES_NET_BACKEND="iptables")
    refused = []

    def one(case):
        argv, dns, conf_text, reply_text = case[1]
        fresh(xen, dict(zip(QDB[2:4], dns)))
        conf.write_text(conf_text or "nameserver 192.0.2.53\n", errors="surrogateescape")
        reply.write_text(reply_text or "", errors="surrogateescape")
        supplied = [*dns, *GOOD_TEXTS, *argv, conf_text, resolved_addresses(reply_text or "")]
        check_real(ns, [str(BIN / "qubes-setup-dnat-to-ns"), "--dry-run", *argv], env, supplied, (0, 1, 2, 100),
                   f"{case!r}", refused, 8)

    run_cases("qubes-setup-dnat-to-ns, real command", st.sampled_from(sorted(DNS_INPUTS)).flatmap(
        lambda n: st.tuples(st.just(n), DNS_INPUTS[n])), one, settings(REAL, max_examples=40))
    print(f"{len(refused)} refused cases also run for real")
