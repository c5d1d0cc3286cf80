"""Whole-namespace dumps over pyroute2: the picture `check` compares with what online would leave."""

from vif_route_qubes.system.ip import FULL, NUD_PERMANENT, RT_TABLE_MAIN, _mapped, _socket, _version

NUD_NOARP = 0x40


@_mapped
def link_states() -> dict[int, tuple[str, bool, int]]:
    """index -> (name, administratively up, interface group) of every interface."""
    return {link["index"]: (link.get_attr("IFLA_IFNAME"), bool(link["flags"] & 1), link.get_attr("IFLA_GROUP") or 0)
            for link in _socket().link("dump")}


@_mapped
def addresses() -> list[tuple[int, str, int]]:
    """(interface index, address, prefix length) of every address."""
    return [(a["index"], a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in _socket().addr("dump")
            if a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")]


@_mapped
def main_routes() -> list[tuple[int, int, str | None, int | None, int]]:
    """(IP version, prefix length, destination or None for default, out interface
    index or None, metric) of the main table's routes, both families."""
    return [(_version(r["family"]), r["dst_len"], r.get_attr("RTA_DST"), r.get_attr("RTA_OIF"),
             r.get_attr("RTA_PRIORITY") or 0)
            for r in _socket().route("dump", table=RT_TABLE_MAIN)
            if r["family"] in FULL and (r.get_attr("RTA_TABLE") or r["table"]) == RT_TABLE_MAIN]


@_mapped
def neighbours() -> list[tuple[int, str, str | None, bool]]:
    """(interface index, address, MAC or None, permanent) of every IPv4/IPv6 neighbour entry,
    but for those `ip neigh show` hides too: no state, or NOARP (multicast mappings)."""
    return [(n["ifindex"], n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"), bool(n["state"] & NUD_PERMANENT))
            for n in _socket().neigh("dump") if n["family"] in FULL and n["state"] not in (0, NUD_NOARP) and n.get_attr("NDA_DST")]
