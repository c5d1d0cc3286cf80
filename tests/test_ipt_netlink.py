"""The raw table read over netlink (vif_route_qubes/ipt_netlink.py, issue "Speed").

With iptables' nf_tables variant a vif event reads only its own rules over
netlink instead of the whole `iptables-save -t raw`.  What it reads must be
what iptables-save shows; a rule it cannot read for certain must send the
event back to iptables-save; and offline's single transaction must leave
exactly what the iptables-restore deletions it prints would.
"""

import json
import os

from netns import BIN, comparable, run_cmd, settled
from test_idempotence import add_vm, hotplug, make_provider, ok

READER = """
import json, sys
from vif_route_qubes import ipt_netlink, ipt_state
vif = sys.argv[1]
mine = ipt_netlink.read_raw(vif)
save = ipt_state.save_both("raw")
out = {"mine": None if mine is None else [[sorted(s.chains), [list(r) for r in s.rules]] for s in mine],
       "save": [[sorted(t.chains), [list(r) for r in t.rules]] for t in (ipt_state.table(x, "raw") for x in save)]}
print(json.dumps(out))
"""


def read(proxy, xen, vif):
    result = run_cmd(proxy, [str(BIN / "python"), "-c", READER, vif], xen.env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def online_three(netns, xen, vifcmd):
    """Three VMs online with iptables: two addresses each way, and vif137.0
    whose name holds vif37.0's bytes but for its first character."""
    proxy = make_provider(netns)
    vms = [add_vm(netns, xen, proxy, domid, addrs=addrs) for domid, addrs in
           [(37, ("10.137.7.27", "fd09:24ef:4179::a89:71b")), (38, ("10.137.7.28", "10.137.7.29")),
            (137, ("10.137.7.30",))]]
    for vif, path in vms:
        ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
    return proxy, vms


def test_what_netlink_reads_is_what_iptables_save_shows(netns, xen, vifcmd):
    proxy, vms = online_three(netns, xen, vifcmd)
    for vif, _ in vms:
        seen = read(proxy, xen, vif)
        assert seen["mine"] is not None
        for (chains, rules), (save_chains, save_rules) in zip(seen["mine"], seen["save"]):
            save_rules = dict((chain, lines) for chain, lines in save_rules)
            assert set(chains) == {"PREROUTING", "QBS-ANTISPOOF", f"QBS-AS-{vif}"} <= set(save_chains)
            for chain, lines in rules:
                if chain == "QBS-ANTISPOOF":
                    # this vif's rules as iptables-save prints them, every other rule counted
                    assert len(lines) == len(save_rules[chain])
                    own = [line for line in save_rules[chain] if f'--comment "{vif}" ' in line]
                    assert [line for line in lines if not line.endswith(" ?")] == own and own
                else:
                    assert lines == save_rules[chain]


def test_a_rule_it_cannot_read_sends_the_event_to_iptables_save(netns, xen, vifcmd):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
    # A rule of this vif's in a form online never writes (made by hand).
    proxy.sh(f'iptables -t raw -A QBS-ANTISPOOF -p tcp -m comment --comment "{vif}" -j DROP')
    assert read(proxy, xen, vif)["mine"] is None
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, "iptables"))
    assert vif not in proxy.out("iptables-save -t raw")  # removed all the same, through iptables-restore


def test_offline_in_one_transaction_equals_its_printed_restores(netns, xen, vifcmd):
    """Twin namespaces with two VMs each: one runs offline of the first
    (netlink, by handle), the other runs the script `offline --dry-run` prints
    (iptables-restore -D lines); the dispatch chain stays for the second VM."""
    states = []
    for twin in ("real", "script"):
        proxy = make_provider(netns)
        vms = [add_vm(netns, xen, proxy, domid, addrs=addrs) for domid, addrs in
               [(37, ("10.137.7.27", "fd09:24ef:4179::a89:71b")), (38, ("10.137.7.28",))]]
        for vif, path in vms:
            ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
        vif, path = vms[0]
        env = xen.env(vif=vif, XENBUS_PATH=path, QUBES_NET_BACKEND="iptables", VIF_ROUTE_TIMING="1")
        if twin == "real":
            result = ok(run_cmd(proxy, [vifcmd, "offline", "type_if=vif"], env))
            assert '"RawDelete"' in result.stderr  # the netlink path ran
        else:
            script = ok(run_cmd(proxy, [vifcmd, "offline", "type_if=vif", "--dry-run"], env)).stdout
            assert "iptables-restore" in script and "ip6tables-restore" in script
            ok(run_cmd(proxy, ["sh", "-e"], xen.env(), input=script))
        rules = proxy.out("iptables-save -t raw; ip6tables-save -t raw")
        assert "vif37.0" not in rules and "vif38.0" in rules
        states.append(comparable(settled(proxy)))
    assert states[0] == states[1]


def test_legacy_iptables_on_path_is_not_read_over_netlink(tmp_path, monkeypatch):
    from vif_route_qubes import ipt_netlink

    for target, expected in (("xtables-legacy-multi", False), ("xtables-nft-multi", True)):
        folder = tmp_path / target
        folder.mkdir()
        (folder / target).write_text("")
        os.symlink(folder / target, folder / "iptables-restore")
        monkeypatch.setenv("PATH", str(folder))
        assert ipt_netlink.nf_tables_variant() is expected
