"""The click-free fast path (vif_route_qubes/fastargs.py) against click (issue "Speed").

Whenever the fast path accepts a command line and environment, click must
accept them too and give exactly the same values; the usual invocations
(Xen hotplug, by hand, NetworkManager) must take the fast path; and taking it
must not import click.  Pure parsing: nothing here touches the network.
"""

import os
import subprocess
import sys
from contextlib import contextmanager

import click
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from setup_dnat_to_ns.commands import cli as dns_cli
from vif_route_qubes.commands import cli as vif_cli
from vif_route_qubes.fastargs import parse_dns, parse_event
from vif_route_qubes.optspec import DNS, EVENT

ENV_NAMES = sorted({o.envvar for o in EVENT + DNS if o.envvar} | {"vif"})


@contextmanager
def environment(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def click_values(command: click.Command, name: str, argv: list[str]) -> dict | None:
    try:
        with command.make_context(name, list(argv)) as ctx:
            return dict(ctx.params)
    except (click.exceptions.Exit, click.ClickException):
        return None


def words(specs) -> st.SearchStrategy:
    flags = [f for o in specs for f in o.flags]
    values = st.sampled_from(["", "vif37.0", "10.137.7.27", "5", "0.05", "1e1", "nan", "-1", "tap", "vif", "nft",
                              "auto", "iptables", "x=y", "--", "-", "-vv", "--mac=", "--hook-timeout=2",
                              "--backend=nft", "--help", "--version", "up", "eth0"])
    pair = st.tuples(st.sampled_from(flags), values).map(list)  # mostly well-formed: a flag and a value
    single = st.one_of(st.sampled_from(flags), values).map(lambda w: [w])
    return st.lists(st.one_of(pair, pair, single), max_size=6).map(lambda parts: sum(parts, []))


def env_values() -> st.SearchStrategy:
    value = st.sampled_from(["", "1", "0", "yes", "vif", "tap", "nft", "bogus", "2.5", "inf", "vif9.1", "/p"])
    return st.dictionaries(st.sampled_from(ENV_NAMES), value, max_size=5)


SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def test_event_fast_path_agrees_with_click():
    accepted = []

    @SETTINGS
    @given(st.sampled_from(["online", "offline", "add", "remove"]), words(EVENT), env_values())
    def case(command, argv, env):
        with environment(env):
            fast = parse_event([command, *argv], os.environ)
            if fast is None:
                return
            accepted.append(1)
            assert fast[0] == command
            assert click_values(vif_cli.commands[command], command, argv) == fast[1]

    case()
    assert len(accepted) >= 200  # the comparison really ran, on many accepted cases


def test_dns_fast_path_agrees_with_click():
    accepted = []

    @SETTINGS
    @given(words(DNS), env_values())
    def case(argv, env):
        with environment(env):
            fast = parse_dns(argv, os.environ)
            if fast is None:
                return
            accepted.append(1)
            expected = click_values(dns_cli, "qubes-setup-dnat-to-ns", argv)
            assert expected is not None
            assert {k: v for k, v in expected.items() if k not in ("check", "as_json")} == fast
            assert not expected["check"] and not expected["as_json"]

    case()
    assert len(accepted) >= 100


def test_usual_invocations_take_the_fast_path():
    hotplug = {"vif": "vif37.0", "XENBUS_PATH": "/local/domain/0/backend/vif/37/0", "type_if": "vif"}
    by_hand = parse_event(["online", "vif37.0", "--xenbus-path", hotplug["XENBUS_PATH"]], {})
    assert parse_event(["online"], hotplug) == by_hand
    assert parse_event(["offline"], hotplug)[1]["xenbus_path"] == hotplug["XENBUS_PATH"]
    manual = ["online", "vif37.0", "10.137.7.27", "--mac", "00:16:3e:5e:6c:19", "--gateway", "10.137.7.1",
              "--gateway6", "", "--no-harden", "--backend=nft", "-v", "--hook-timeout", "2"]
    values = parse_event(manual, {})[1]
    assert values["addresses"] == ("10.137.7.27",) and values["gateway6"] == "" and values["harden"] is False
    assert values["backend"] == "nft" and values["verbose"] and values["hook_timeout"] == 2.0
    assert parse_dns(["eth0", "dhcp4-change"], {})["action"] == "dhcp4-change"
    assert parse_dns([], {"QUBES_NET_BACKEND": "nft"})["backend"] == "nft"


def test_refused_and_rare_forms_go_to_click():
    for argv in (["online", "--help"], ["online", "--hook-timeout", "nan"], ["online", "--", "vif1.0"],
                 ["online", "--mac"], ["online", "--mac", "a", "--mac", "b"], ["init"], ["check", "--all"],
                 ["online", "--dry-run=1"], ["frob"], []):
        assert parse_event(argv, {}) is None, argv
    assert parse_event(["online"], {"VIF_ROUTE_DRY_RUN": "1"}) is None  # click reads flag variables
    assert parse_event(["online"], {"type_if": "bogus"}) is None
    for argv in (["eth0"], ["--check"], ["a", "b", "c"], ["--version"]):
        assert parse_dns(argv, {}) is None, argv


def test_fast_path_does_not_import_click():
    # `add` of a vif is a no-op, so this runs the whole fast path and changes nothing.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "vif_route_qubes", "add", "type_if=vif"],
                            capture_output=True, text=True, env=dict(os.environ, vif="vif37.0"))
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "vif_route_qubes.event" in imported  # the fast path ran
    assert not [name for name in imported if name.split(".")[0] == "click"]
