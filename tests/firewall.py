"""Backend-aware views of a namespace's firewall, for tests that run under both
backends (the `backend` fixture): what they assert stays the same, only where
it is read differs.

  iptables  the raw tables: QBS-ANTISPOOF jumps to QBS-AS-<vif>, which RETURNs
            the VM's addresses and DROPs the rest
  nft       the `ip qubes` / `ip6 qubes` tables: `"<vif>" . <addr>` elements of
            the `allowed` sets, each address in `downstream`, the vif in
            interface group 2 (what `prerouting` sends to `antispoof`)
"""

import json
import re

BACKENDS = ("iptables", "nft")


def nft_tables(ns) -> str:
    """`nft -s list table` of ip qubes and ip6 qubes (nothing for a missing table)."""
    return "".join(ns.sh(f"nft -s list table {family} qubes", check=False).stdout for family in ("ip", "ip6"))


def antispoof_text(ns, backend: str) -> str:
    """Where the anti-spoofing state lives, as text."""
    if backend == "nft":
        return nft_tables(ns)
    return ns.out("iptables-save -t raw") + ns.out("ip6tables-save -t raw")


def has_shared_objects(ns, backend: str) -> bool:
    """Whether what all vifs share is there: the QBS-ANTISPOOF chains, or the qubes tables."""
    if backend == "nft":
        return bool(nft_tables(ns).strip())
    return "QBS-" in antispoof_text(ns, "iptables")


def nft_set(ns, family: str, name: str) -> list:
    """The elements of set `name` of table `family qubes` (JSON form)."""
    listing = json.loads(ns.out(f"nft -j list set {family} qubes {name}"))["nftables"]
    return next(item["set"] for item in listing if "set" in item).get("elem", [])


def link_group(ns, ifname: str) -> str:
    return re.search(r" group (\S+)", ns.out(f"ip link show dev {ifname}")).group(1)


def antispoof_sources(ns, backend: str, vif: str) -> set[str]:
    """The source addresses `vif` may send from, after checking that everything
    else from it is dropped (the DROP at the end of its chain and the jump to it;
    or the vif in group 2 and each address also in `downstream`)."""
    if backend == "nft":
        assert link_group(ns, vif) == "2", ns.out(f"ip link show dev {vif}")
        sources = set()
        for family in ("ip", "ip6"):
            mine = {e["concat"][1] for e in nft_set(ns, family, "allowed") if e["concat"][0] == vif}
            missing = mine - set(nft_set(ns, family, "downstream"))
            assert not missing, f"{family} qubes downstream lacks {missing}"
            sources |= mine
        return sources
    rules = antispoof_text(ns, "iptables")
    chain = re.escape(f"QBS-AS-{vif}")
    for save in rules.split("COMMIT"):
        if f"QBS-AS-{vif}" in save:
            assert re.findall(rf"^-A {chain} .*$", save, re.M)[-1] == f"-A QBS-AS-{vif} -j DROP", save
            assert f'-A QBS-ANTISPOOF -i {vif} -m comment --comment "{vif}" -j QBS-AS-{vif}\n' in save, save
    assert rules.count(f"-A QBS-AS-{vif} -j DROP") == 2, rules  # IPv4 and IPv6
    return set(re.findall(rf"^-A {chain} -s (\S+)/\d+ -j RETURN$", rules, re.M))
