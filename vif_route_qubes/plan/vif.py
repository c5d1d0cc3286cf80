"""The pure planner for `online` and `offline`: inputs and facts in, a Batch out.

One builder per feature, each taking `enable` so that offline is the mirror of
online; the two orders below are the only place that says what comes first.
"""

from vif_route_qubes.model import VifFacts, VifInputs
from vif_route_qubes.plan import antispoof_ipt, mapped, nft
from vif_route_qubes.plan.batch import (Addr, Batch, ConntrackPurge, Group, Hook, Link, Neigh, Note, Rename,
                                        Route, Sysctl, XenstoreWrite)

# Hardening: the settings of Qubes' network/81-qubes.conf.optional, per vif and system-wide.
# IPv6 accept_source_route -1: no routing header at all (0 would still take type 2).
HARDEN_V4 = {"accept_source_route": "0", "accept_redirects": "0", "secure_redirects": "0", "send_redirects": "0",
             "drop_unicast_in_l2_multicast": "1"}
HARDEN_V6 = {"accept_source_route": "-1", "accept_redirects": "0", "accept_ra": "0", "autoconf": "0",
             "accept_dad": "0", "drop_unsolicited_na": "1", "drop_unicast_in_l2_multicast": "1"}
# System-wide: left on offline (other vifs rely on them).  The file's max_hbh_opts_length
# names no sysctl of the kernel and is skipped.  Without an IPv6 stack its two are moot.
HARDEN_SYSTEM = {"net/ipv6/max_dst_opts_length": "0", "net/ipv6/conf/all/accept_dad": "0",
                 "net/ipv4/conf/all/accept_redirects": "0"}


def antispoof(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    if facts.backend == "nft":
        step = nft.plan_vif(facts.nft, inp.vif, inp.addresses, enable)
        return [step] if step else []
    return antispoof_ipt.plan_vif(facts.ipt, inp.vif, inp.addresses, enable)


def held_by_other_vifs(inp: VifInputs, facts: VifFacts) -> frozenset[str]:
    """This VM's addresses that another vif's anti-spoofing still holds (the
    VM restarted under a new domid before this, its old vif's, offline):
    their shared state, the connection tracking among it, is that vif's now.
    nft's facts hold every `allowed` pair of this VM's addresses; the ipset
    layout asks the kernel about each address this offline would release
    (facts.ipsets: route and test)."""
    if facts.backend == "nft":
        if facts.nft is None:
            return frozenset()
        return frozenset(addr for table in facts.nft.tables.values() for name, addr in table.allowed
                         if name != inp.vif)
    if facts.ipt is None:
        return frozenset()
    return frozenset(addr for held in facts.ipt.held.values() for addr in held.others)


def conntrack(inp: VifInputs, keep: frozenset[str] = frozenset()) -> list:
    addresses = tuple(str(a) for a in inp.addresses if str(a) not in keep)
    return [ConntrackPurge(addresses)] if addresses else []


def _v6_usable(inp: VifInputs, facts: VifFacts, what: str) -> tuple[bool, list]:
    if facts.ipv6_enabled:
        return True, []
    return False, [Note(f"{inp.vif}: IPv6 is disabled on the interface, {what} not configured", error=True)]


def sysctls(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    conf4 = f"net/ipv4/conf/{inp.vif}"
    conf6 = f"net/ipv6/conf/{inp.vif}"
    tolerant = not enable
    steps = [Sysctl(f"{conf4}/proxy_arp", "1" if enable else "0", tolerant)]
    has_gw6 = inp.gateway6 is not None and not inp.gateway6.is_link_local
    if has_gw6 and facts.ipv6_enabled:
        steps.append(Sysctl(f"{conf6}/proxy_ndp", "1" if enable else "0", tolerant))
    if enable and inp.harden:
        steps += [Sysctl(f"{conf4}/{key}", value) for key, value in HARDEN_V4.items()]
        if facts.ipv6_enabled:
            steps += [Sysctl(f"{conf6}/{key}", value) for key, value in HARDEN_V6.items()]
        steps += [Sysctl(path, value, tolerant=path.startswith("net/ipv6/")) for path, value in HARDEN_SYSTEM.items()]
    elif inp.harden:
        # The vif's own settings back to those of a new interface (conf/default); the
        # system-wide ones stay, other vifs rely on them.
        steps += [Sysctl(path, value, tolerant) for path, value in facts.harden_defaults
                  if facts.ipv6_enabled or not path.startswith("net/ipv6/")]
    return steps


def link(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    steps = [Link(inp.vif, up=enable, tolerant=not enable)]
    if facts.backend == "nft":
        # nft matches vifs by interface group: set before the link is up, reset after it is down.
        group = Group(inp.vif, 2) if enable else Group(inp.vif, 0, tolerant=True)
        steps.insert(0 if enable else 1, group)
    return steps


def gateways(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    steps = []
    if inp.gateway is not None:
        steps.append(Addr(inp.vif, str(inp.gateway), 32, 4, enable))
    if inp.gateway6 is not None and not inp.gateway6.is_link_local:
        usable, notes = _v6_usable(inp, facts, f"gateway {inp.gateway6}")
        steps += [Addr(inp.vif, str(inp.gateway6), 128, 6, enable)] if usable or not enable else notes
    return steps


def routes(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    steps = []
    for addr in inp.addresses:
        if addr.version == 6 and enable and not facts.ipv6_enabled:
            steps += _v6_usable(inp, facts, f"route to {addr}")[1]
            continue
        steps.append(Route(inp.vif, str(addr), addr.version, inp.metric, enable))
    ours = {str(a) for a in inp.addresses}
    for version, addr, metric in facts.host_routes:
        # Left over (online and offline alike): a route at our metric to an
        # address the VM no longer has, or to one of its addresses at another.
        if (metric == inp.metric) != (addr in ours):
            steps.append(Route(inp.vif, addr, version, metric, False))
    return steps


def neighbours(inp: VifInputs, facts: VifFacts, enable: bool) -> list:
    steps = []
    if inp.mac is not None:
        steps += [Neigh(inp.vif, str(a), a.version, inp.mac, enable)
                  for a in inp.addresses if a.version == 4 or facts.ipv6_enabled or not enable]
    # Permanent entries of addresses the VM no longer has; offline with no MAC
    # (it learns from the kernel, app/offline.py) removes every one the vif has.
    done = {str(a) for a in inp.addresses} if enable or inp.mac is not None else set()
    steps += [Neigh(inp.vif, addr, version, "", False) for version, addr in facts.neighbours if addr not in done]
    return steps


def hooks(inp: VifInputs) -> list:
    per_addr = [str(a) for a in inp.addresses] or [None]
    steps = []
    for path in inp.hooks:
        for addr in per_addr:
            args = (inp.command, inp.vif, inp.dev_type) + ((addr,) if addr else ())
            steps.append(Hook(path, args, inp.hook_timeout))
    return steps


def status(inp: VifInputs) -> list:
    if inp.xenbus_path is None:
        return []
    return [XenstoreWrite(((f"{inp.xenbus_path}/hotplug-status", "connected"),))]


def plan_online(inp: VifInputs, facts: VifFacts) -> Batch:
    steps = []
    if facts.rename_pending:
        steps.append(Rename(inp.rename_from, inp.vif))
    if inp.mapped:
        steps += mapped.plan_online(inp, facts.mapped, facts.exists)
        inp = mapped.main_side(inp)
    # Anti-spoofing first: the link must never be up without it.
    steps += antispoof(inp, facts, True)
    steps += conntrack(inp)
    steps += sysctls(inp, facts, True)
    steps += link(inp, facts, True)
    steps += gateways(inp, facts, True)
    steps += routes(inp, facts, True)
    steps += neighbours(inp, facts, True)
    steps += hooks(inp)
    steps += status(inp)
    return Batch(f"vif-route-qubes online {inp.vif}", tuple(steps))


def plan_offline(inp: VifInputs, facts: VifFacts) -> Batch:
    steps = []
    title = f"vif-route-qubes offline {inp.vif}"
    if facts.mapped and facts.mapped.netns_exists:
        full, inp = inp, mapped.main_side(inp)
        tail = mapped.plan_offline(full, facts.mapped, facts.exists)
    else:
        tail = []
    if facts.exists:
        steps += routes(inp, facts, False)
        steps += neighbours(inp, facts, False)
        steps += gateways(inp, facts, False)
        steps += link(inp, facts, False)
        steps += sysctls(inp, facts, False)
    # Rules go last, once nothing routes to the VM any more.
    steps += antispoof(inp, facts, False)
    # The connections of a vif that holds the address now are not ours to end.
    steps += conntrack(inp, held_by_other_vifs(inp, facts))
    steps += tail
    steps += hooks(inp)
    return Batch(title, tuple(steps))
