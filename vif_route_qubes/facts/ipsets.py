"""What the iptables backend's anti-spoofing planner needs, read for one vif:
the sets' headers (cheap, whatever the number of VMs), the vif's own
elements tested one by one, and the raw tables only when the static parts
are missing (or of the old layout) or this may be the last vif's offline.
The `allowed` set is read whole only when it has more pairs than
`downstream` has addresses (a pair made by hand, or a restarted VM's two vifs),
or for an offline that the kernel cannot tell all the vif's addresses: in a
family where they need not have a route (the interface gone, or IPv6 off on
it), or after a killed event (no route or no permanent neighbour left on the
vif): it learns them from the set."""

from vif_route_qubes.facts import ipt_state
from vif_route_qubes.model import VIF_NAME
from vif_route_qubes.plan import antispoof_ipt, elements
from vif_route_qubes.system import ip
from vif_route_qubes.system.ipset import Ipsets, SetInfo


def read_sets(ipsets: Ipsets) -> dict[str, SetInfo]:
    return ipsets.infos((*antispoof_ipt.SET_NAMES, antispoof_ipt.BASE_SET))


def read_raw() -> dict:
    save4, save6 = ipt_state.save_both("raw")
    return {4: antispoof_ipt.parse_save(save4), 6: antispoof_ipt.parse_save(save6)}


def _held_elsewhere(ipsets: Ipsets, version: int, addr: str, vif: str) -> bool:
    """Another vif holds `addr` in `allowed`: the vif the kernel routes it
    through (a restarted VM's new vif, whose route has the lower metric), when
    that vif has the pair.  One route look-up and one test, not a listing."""
    dev = ip.route_dev(addr)
    return (dev is not None and dev != vif and bool(VIF_NAME.fullmatch(dev))
            and ipsets.test(antispoof_ipt.set_name(elements.ALLOWED, version), version, (addr, dev)))


def read_facts(ipsets: Ipsets, vif: str, addresses: tuple, host_routes: tuple,
               enable: bool, routed: frozenset = frozenset({4, 6}), neighbours: tuple = ()) -> antispoof_ipt.IptFacts:
    """`routed`: the families in which every address of the vif has a route (the
    vif is there, with IPv6 on for 6): an offline that learns its addresses from
    the kernel reads the set whole for the others, where a pair may have no route.
    In the routed ones the vif's routes and permanent neighbours name all its
    addresses while it has both: routes come before neighbours in online and in
    offline (plan/vif.py), so while any route is left a killed offline has not
    touched the neighbours, and while any neighbour is there a killed online has
    made every route.  With no route, or no neighbour (killed, or no MAC), left
    on the vif, every family is read whole: a pair may have neither."""
    sets = read_sets(ipsets)
    held = {}
    kernel_names_all = bool(host_routes) and bool(neighbours)
    for version in (4, 6):
        allowed = antispoof_ipt.set_name(elements.ALLOWED, version)
        downstream = antispoof_ipt.set_name(elements.DOWNSTREAM, version)
        want = {str(a) for a in addresses if a.version == version}
        # The vif's own pairs: the addresses it is given, routes and keeps neighbours for.
        routes = {addr for v, addr, _ in host_routes if v == version}
        candidates = want | routes | {addr for v, addr in neighbours if v == version}
        mine = {a for a in candidates if sets[allowed].exists and ipsets.test(allowed, version, (a, vif))}
        down = {a for a in candidates if sets[downstream].exists and ipsets.test(downstream, version, (a,))}
        # An offline's pairs the kernel may not name (see the docstring).
        unnamed = (not enable and sets[allowed].elements > len(mine)
                   and (version not in routed or not kernel_names_all))
        if sets[allowed].elements > sets[downstream].elements or (want - mine) & down or unnamed:
            # More pairs than addresses, or an address of ours with no pair (a pair
            # changed by hand, or a restarted VM's two vifs), or such an offline.
            # Only then is the set read whole.
            extra = {e[0] for e in ipsets.members(allowed) or () if e[1:] == (vif,)} - mine
            mine |= extra
            down |= {a for a in extra if ipsets.test(downstream, version, (a,))}
        going = (mine - want if enable else mine) & down
        others = {a for a in going if _held_elsewhere(ipsets, version, a, vif)}
        held[version] = elements.Held(frozenset(mine), frozenset(down), frozenset(others))
    raw = None
    if not antispoof_ipt.static_ok(sets):
        raw = read_raw()
    elif (not enable and not sets[antispoof_ipt.BASE_SET].exists
          and all(sets[antispoof_ipt.set_name(elements.ALLOWED, v)].elements == len(held[v].mine) for v in (4, 6))):
        raw = read_raw()  # perhaps the last vif, and no marker: does a base (init) keep the static parts?
    return antispoof_ipt.IptFacts(sets, held, raw)
