"""`vif-route-qubes check` and `qubes-setup-dnat-to-ns --check`: what differs
between the system and what the inputs say it should be.  Read-only.

"Should be" is never written down twice: a vif's state is the batch `online`
plans for it (plan_vif.plan_online: sysctls, link, gateway addresses, routes,
neighbours), its anti-spoofing elements and static rules are compared in
check/antispoof.py (both backends), and the DNS chains and jumps are what the
DNS planner installs on empty tables.  The comparisons are pure functions of
the inputs and of a NetState read once (pyroute2 dumps, the sets, iptables-save or
nft, /proc/sys) under the events' lock taken shared.

The report's types are in check/report.py.  Exit status: 0 as it should be, 1 differences (one line each, or --json),
2 usage error or refused input, 1 also when the system could not be read.
"""

import sys
from dataclasses import replace

from vif_route_qubes import logsetup
from vif_route_qubes.check import antispoof as antispoof_drift
from vif_route_qubes.check.report import Drift, report
from vif_route_qubes.check.state import NetState, norm, read_state
from vif_route_qubes.errors import InputError, VifError
from vif_route_qubes.inputs import read as inputs
from vif_route_qubes.model import VIF_NAME, VifFacts, VifInputs
from vif_route_qubes.optspec import VifArgs
from vif_route_qubes.plan import antispoof_ipt, elements, mapped
from vif_route_qubes.plan import vif as plan_vif
from vif_route_qubes.plan.batch import Addr, Group, IpsetElements, Link, Neigh, Nft, NftElements, Route, Sysctl
from vif_route_qubes.system import sources
from vif_route_qubes.system.backend import resolve
from vif_route_qubes.system.ipset import SetInfo
from vif_route_qubes.system.lock import shared_lock


def _drifts(found) -> list[Drift]:
    return [Drift(*item) for item in found]


def jump_drift(raw: dict) -> list[Drift]:
    """The jump from raw PREROUTING to the static rules: exactly one per family."""
    out = []
    for family in (4, 6):
        jumps = [j for j in raw[family].rules_of("PREROUTING") if j in (antispoof_ipt.JUMP, antispoof_ipt.BASE_JUMP)]
        where = f"{'ip6' if family == 6 else 'ip'}tables raw PREROUTING"
        if len(jumps) != 1:
            kind, what = ("jump-missing", f"missing from {where}") if not jumps else \
                ("jump-duplicated", f"duplicated {len(jumps)} times in {where}")
            out.append(Drift(antispoof_ipt.DISPATCH, kind, f"jump {what}: {(jumps or [antispoof_ipt.JUMP])[0]}"))
    return out


def shared_drift(net: NetState) -> list[Drift]:
    """The static parts every vif relies on (sets, rules, jump), named once."""
    out = _drifts(antispoof_drift.static_drift(net.fw))
    if net.fw.backend == "iptables":
        out = jump_drift(net.fw.raw) + out
    return out


def stale_drift(vif: str, net: NetState) -> list[Drift]:
    """The elements of a vif whose interface is gone.  (Its routes, addresses and
    neighbours went with the interface: the kernel flushes them.)"""
    return _drifts(antispoof_drift.stale_drift(net.fw, vif))


def _facts(net: NetState, inp: VifInputs, exists: bool, pending: bool, probe: str) -> VifFacts:
    """What the planner would have read, from the check's full read."""
    fw = net.fw
    common = dict(exists=exists, rename_pending=pending,
                  ipv6_enabled=net.read_sysctl(f"net/ipv6/conf/{probe}/disable_ipv6") == "0")
    if fw.backend == "nft":
        return VifFacts(backend="nft", nft=fw.nft_state, **common)
    sets = {}
    for version in (4, 6):
        view = fw.sets[version]
        for kind, count in ((elements.ALLOWED, len(view.allowed)), (elements.DOWNSTREAM, len(view.downstream))):
            name = antispoof_ipt.set_name(kind, version)
            sets[name] = SetInfo(name not in fw.missing, count, 1)
    held = {v: elements.of_pairs(inp.vif, fw.sets[v].allowed, fw.sets[v].downstream) for v in (4, 6)}
    return VifFacts(ipt=antispoof_ipt.IptFacts(sets, held, fw.raw), **common)


def steps_drift(inp: VifInputs, steps: tuple, net: NetState) -> list[Drift]:
    """Each step of the online batch that is not in effect, and routes online would not make."""
    vif, out = inp.vif, []
    for step in steps:
        if isinstance(step, Group) and (have := net.groups.get(step.ifname, 0)) != step.group:
            out.append(Drift(vif, "group", f"interface group is {have}, should be {step.group}"))
        elif isinstance(step, Sysctl) and (have := net.read_sysctl(step.path)) != step.value:
            if have is None and step.tolerant:
                continue  # a file that may be absent (no IPv6 stack)
            if f"/{vif}/" in step.path:
                name = ("IPv6 " if step.path.startswith("net/ipv6/") else "") + step.path.rsplit("/", 1)[1]
            else:  # a system-wide setting: its sysctl key
                name = step.path.replace("/", ".")
            out.append(Drift(vif, "sysctl", f"{name} is {have or 'missing'}, should be {step.value}"))
        elif isinstance(step, Link) and step.up and not net.links.get(step.ifname):
            out.append(Drift(vif, "link-down", "link down"))
        elif isinstance(step, Addr) and step.add and f"{norm(step.address)}/{step.prefixlen}" not in net.addrs.get(vif, ()):
            what = "gateway" if step.family == 4 else "IPv6 gateway"
            out.append(Drift(vif, "address-missing", f"{what} address {step.address}/{step.prefixlen} missing"))
        elif isinstance(step, Route) and step.add and (norm(step.address), vif, step.metric) not in net.routes:
            out.append(Drift(vif, "route-missing", f"route {step.address} metric {step.metric} missing"))
        elif isinstance(step, Neigh) and step.add:
            lladdr, permanent = net.neighs.get((vif, norm(step.address)), (None, False))
            if lladdr is None:
                out.append(Drift(vif, "neighbour-missing", f"neighbour {step.address} lladdr {step.mac} missing"))
            elif lladdr != step.mac:
                out.append(Drift(vif, "neighbour-wrong-mac",
                                 f"neighbour {step.address} has MAC {lladdr}, should be {step.mac}"))
            elif not permanent:
                out.append(Drift(vif, "neighbour-not-permanent", f"neighbour {step.address} is not permanent"))
    # Other routes to the VM's addresses (a lower metric wins over ours; another
    # vif's own route is that vif's business), and routes of this vif's metric
    # to addresses that are not the VM's.
    mine = {str(a) for a in inp.addresses}
    for dst, dev, metric in net.routes:
        if dst in mine and (dev, metric) != (vif, inp.metric) and not _vif_route(dev, metric):
            why = "not the VM's route"
        elif dev == vif and metric == inp.metric and dst not in mine:
            why = "not an address of the VM"
        else:
            continue
        out.append(Drift(vif, "route-unexpected", f"unexpected route {dst} dev {dev} metric {metric} ({why})"))
    out += [Drift(vif, "neighbour-unexpected", f"unexpected permanent neighbour {dst} (not an address of the VM)")
            for (dev, dst), (_, permanent) in net.neighs.items() if dev == vif and permanent and dst not in mine]
    return out


def vif_drift(inp: VifInputs, net: NetState) -> list[Drift]:
    """Everything that differs from what `online` leaves for this vif."""
    if inp.mapped:  # here the veth end for the real address; inside its namespace: not compared
        name = mapped.netns_name(inp)
        gone = [] if name in net.netns else [Drift(inp.vif, "netns-missing", f"namespace {name} missing")]
        return gone + vif_drift(mapped.main_side(inp)._replace(mapped=None), net)
    exists = inp.vif in net.links
    pending = bool(inp.rename_from and not exists and inp.rename_from in net.links)
    if not exists and not pending:
        return stale_drift(inp.vif, net) or [Drift(inp.vif, "no-interface", "no such interface")]
    probe = inp.rename_from if pending else inp.vif
    batch = plan_vif.plan_online(inp, _facts(net, inp, exists, pending, probe))
    out = _drifts(antispoof_drift.vif_drift(net.fw, inp.vif, inp.addresses))
    # The planner's own verdict is the last word: it must not see a change we cannot name.
    # (A missing set or static rule is named once for all vifs.)
    if (not out and any(isinstance(s, (IpsetElements, Nft, NftElements)) for s in batch.steps)
            and not antispoof_drift.static_drift(net.fw)):
        out.append(Drift(inp.vif, "rules-differ", "anti-spoofing elements differ from what online would install"))
    if pending:
        return [Drift(inp.vif, "not-renamed", f"interface still named {inp.rename_from}"), *out]
    return out + steps_drift(inp, batch.steps, net)


def _vif_route(dev: str | None, metric: int) -> bool:
    """A route of our metric scheme: through vifD.N with metric 32752 - D."""
    match = VIF_NAME.fullmatch(dev or "")
    return bool(match) and metric == 32752 - int(match.group(1))


def discover(net: NetState) -> list[str]:
    """Every vif there is something of: interfaces, set elements, routes of our metrics."""
    names = set(net.links) | antispoof_drift.vifs_of(net.fw)
    names |= {dev for _, dev, metric in net.routes if _vif_route(dev, metric)}
    return sorted((n for n in names if VIF_NAME.fullmatch(n)),
                  key=lambda n: tuple(map(int, VIF_NAME.fullmatch(n).groups())))


# -- inputs of --all, and the command ---------------------------------------

def _in_xenstore(path: str) -> bool:
    """Whether xenstore holds a backend's `ip` (no xenstore at all: no)."""
    try:
        return bool(sources.xenstore_read([f"{path}/ip"]))
    except VifError:
        return False


def _all_vifs(args, net: NetState) -> list[Drift]:
    """--all: a vif's inputs come from xenstore (backend/vif/D/N, relative: xenstore
    resolves it against this domain's home, as for xl devd) when it has the vif, else
    its addresses from its rules; qubesdb is read once."""
    fill = {f: k for f, k in (("gateway", inputs.QDB_GATEWAY), ("gateway6", inputs.QDB_GATEWAY6),
                              ("dns1", inputs.QDB_DNS[0]), ("dns2", inputs.QDB_DNS[1])) if getattr(args, f) is None}
    qdb = inputs.qubesdb([*fill.values(), inputs.QDB_HARDEN])
    harden = args.harden if args.harden is not None else inputs.harden_flag(qdb.get(inputs.QDB_HARDEN))
    args = replace(args, **{f: qdb.get(k, "") for f, k in fill.items()}, harden=harden)
    names = discover(net)
    out = shared_drift(net) if any(name in net.links for name in names) else []
    expected = set()
    for name in names:
        if name not in net.links:
            out += stale_drift(name, net)
            continue
        path = "backend/vif/{}/{}".format(*VIF_NAME.fullmatch(name).groups())
        if _in_xenstore(path):
            vif_args = replace(args, vif=name, xenbus_path=path, addresses=None)
        else:
            addresses = tuple(antispoof_drift.addresses_of(net.fw, name))
            vif_args = replace(args, vif=name, xenbus_path=None, addresses=addresses)
        try:
            vif_inp = inputs.read_vif_inputs(vif_args)
            expected |= {str(a) for a in vif_inp.addresses}
            out += vif_drift(vif_inp, net)
        except InputError as exc:
            out.append(Drift(name, "bad-input", str(exc)))
    return out + _drifts(antispoof_drift.foreign_drift(net.fw, frozenset(expected)))


def run_vif_check(params: dict, every: bool, as_json: bool, out=sys.stdout) -> int:
    """`vif-route-qubes check [VIF [ADDR...]] | --all`; params: the event commands' options."""
    logsetup.setup(params["verbose"])

    def collect() -> list[Drift]:
        if every == bool(params["vif"]):
            raise InputError("give a VIF or --all (not both)")
        firewall = resolve(params["backend"])
        args = VifArgs.from_params(params, command="online", addresses=inputs.given_addresses(params["addresses"]))
        inp = None if every else inputs.read_vif_inputs(args)
        with shared_lock(params["lock_file"], params["lock_timeout"]):
            net = read_state(() if every else (inp.vif, inp.rename_from), firewall)
        if every:
            return _all_vifs(args, net)
        return (shared_drift(net) if inp.vif in net.links else []) + vif_drift(inp, net)

    return report("vif-route-qubes", collect, as_json, out)
