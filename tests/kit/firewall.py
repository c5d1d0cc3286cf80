"""Backend-aware views of a namespace's firewall, for tests that run under both
backends (the `backend` fixture): what they assert stays the same, only where
it is read differs.

  iptables  the raw tables: PREROUTING jumps to QBS-ANTISPOOF, whose static rules
            drop from vif+ what is not in qbs-allowedN (address,vif) and from
            any other interface what is in qbs-downstreamN
  nft       the `ip qubes` / `ip6 qubes` tables: `"<vif>" . <addr>` elements of
            the `allowed` sets, each address in `downstream`, the vif in
            interface group 2 (what `prerouting` sends to `antispoof`)
"""

import json
import re
import shutil
from pathlib import Path

BACKENDS = ("iptables", "nft")
NFT = shutil.which("nft") or "/usr/sbin/nft"
# The program through which each backend changes the firewall (what a fault is injected into).
CHANGE_TOOL = {"iptables": "iptables-restore", "nft": "nft"}


def nft_tables(ns) -> str:
    """`nft -s list table` of ip qubes and ip6 qubes (nothing for a missing table)."""
    return "".join(ns.sh(f"nft -s list table {family} qubes", check=False).stdout for family in ("ip", "ip6"))


def antispoof_text(ns, backend: str) -> str:
    """Where the anti-spoofing state lives, as text."""
    if backend == "nft":
        return nft_tables(ns)
    return ns.out("iptables-save -t raw") + ns.out("ip6tables-save -t raw") + ns.out("ipset save")


def has_shared_objects(ns, backend: str) -> bool:
    """Whether what all vifs share is there: the QBS-ANTISPOOF chains and the ipsets, or the qubes tables."""
    if backend == "nft":
        return bool(nft_tables(ns).strip())
    return "QBS-" in antispoof_text(ns, "iptables") or "qbs-" in ns.out("ipset list -n")


IPT_STATIC = {
    4: ("-A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed4 src,src -j DROP",
        "-A QBS-ANTISPOOF ! -i vif+ -m set --match-set qbs-downstream4 src -j DROP"),
    6: ("-A QBS-ANTISPOOF -i vif+ -m set ! --match-set qbs-allowed6 src,src -j DROP",
        "-A QBS-ANTISPOOF ! -i vif+ -m set --match-set qbs-downstream6 src -j DROP"),
}


def ipset_members(ns, name: str) -> list[str] | None:
    """The elements of an ipset as `ipset save` prints them (`ADDR,VIF` or `ADDR`); None when missing."""
    result = ns.sh(f"ipset save {name}", check=False)
    if result.returncode != 0:
        return None
    return [line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.startswith(f"add {name} ")]


def ipt_problems(ns, vif: str, own: dict) -> list[str]:
    """What is missing of `vif`'s iptables anti-spoofing: the static rules first in
    QBS-ANTISPOOF (jumped to from raw PREROUTING, nothing before them that
    accepts), qbs-allowedN holding exactly `vif`'s own addresses, qbs-downstreamN
    holding each of them."""
    problems = []
    for version, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        raw = ns.out(f"{tool} -t raw").splitlines()
        prerouting = [line for line in raw if line.startswith("-A PREROUTING ")]
        if not prerouting or not re.fullmatch(r"-A PREROUTING (.* )?-j QBS-ANTISPOOF", prerouting[0]):
            problems.append(f"{tool}: raw PREROUTING does not jump to QBS-ANTISPOOF first: {prerouting}")
        chain = [line for line in raw if line.startswith("-A QBS-ANTISPOOF ")]
        if tuple(chain[:2]) != IPT_STATIC[version]:
            problems.append(f"{tool}: QBS-ANTISPOOF does not start with the static rules: {chain}")
        allowed = ipset_members(ns, f"qbs-allowed{version}")
        downstream = ipset_members(ns, f"qbs-downstream{version}")
        if allowed is None or downstream is None:
            problems.append(f"ipset qbs-allowed{version} or qbs-downstream{version} missing")
            continue
        mine = {entry.rsplit(",", 1)[0] for entry in allowed if entry.rsplit(",", 1)[1] == vif}
        if mine != own[version]:
            problems.append(f"qbs-allowed{version} lets {mine} through instead of {own[version]}")
        if missing := own[version] - set(downstream):
            problems.append(f"qbs-downstream{version} lacks {missing}")
    return problems


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
    sources = set()
    for version in (4, 6):
        allowed = ipset_members(ns, f"qbs-allowed{version}") or []
        mine = {entry.rsplit(",", 1)[0] for entry in allowed if entry.rsplit(",", 1)[1] == vif}
        sources |= mine
    problems = ipt_problems(ns, vif, {4: {a for a in sources if ":" not in a}, 6: {a for a in sources if ":" in a}})
    assert not problems, problems
    return sources


def nft_stand_in(on_change: str) -> str:
    """The body of a stand-in `nft` that runs the shell code `on_change` when called
    for a transaction (`nft -f`, the nft backend's only change) and otherwise is
    the real nft: its reads (`nft -j list ruleset`) work, so whatever `on_change`
    does happens where iptables-restore runs for the iptables backend, once the
    state has been read."""
    return f'for arg; do\n  case $arg in -f|--file)\n{on_change}\n  ;; esac\ndone\nexec {NFT} "$@"'


def failing_change_tool(folder: Path, backend: str) -> str:
    """Write into `folder` (to go first on PATH) a stand-in of the backend's change
    tool that fails: iptables-restore always, nft on its transaction; returns the
    tool's name (what the failure message must name)."""
    fail = "echo 'injected restore failure' >&2; exit 1"
    tool = CHANGE_TOOL[backend]
    body = nft_stand_in(fail) if backend == "nft" else fail
    (folder / tool).write_text(f"#!/bin/sh\n{body}\n")
    (folder / tool).chmod(0o755)
    return tool


def nft_chain_rules(listing: str, chain: str) -> list[str] | None:
    """The rules of `chain` in an `nft -s list table` listing (its `type ...` line
    apart), or None when the chain is missing."""
    found = re.search(rf"^\tchain {re.escape(chain)} {{\n(.*?)^\t}}", listing, re.M | re.S)
    if not found:
        return None
    rules = [line.strip() for line in found.group(1).splitlines()]
    return [rule for rule in rules if rule and not rule.startswith("type ")]


def guard_problems(ns, backend: str, vif: str, own4: set[str], own6: set[str]) -> list[str]:
    """What is missing of `vif`'s anti-spoofing (README layout), per family; own4 and
    own6 are the sources it must let through, everything else from it is dropped.
      iptables  PREROUTING jumps first to QBS-ANTISPOOF, which starts with the
                static rules; qbs-allowedN holds exactly `vif`,own, qbs-downstreamN own
      nft       `vif` in group 2; prerouting (raw) sends group 2 to antispoof
                first; antispoof accepts @allowed, accepts nothing else, ends in
                drop; allowed holds exactly `vif` . own, downstream holds own"""
    problems = []
    if backend == "nft":
        shown = ns.sh(f"ip -o link show dev {vif}", check=False).stdout
        group = re.search(r" group (\S+)", shown)
        if not group or group.group(1) != "2":
            problems.append(f"{vif} is not in interface group 2: {shown.strip()}")
        for family, saddr, own in (("ip", "ip saddr", own4), ("ip6", "ip6 saddr", own6)):
            listing = ns.sh(f"nft -s list table {family} qubes", check=False).stdout
            if not listing.strip():
                problems.append(f"{family}: no table {family} qubes")
                continue
            head = re.search(r"^\tchain prerouting {\n\t\t(type [^\n]*)", listing, re.M)
            if not head or not head.group(1).startswith("type filter hook prerouting priority raw;"):
                problems.append(f"{family}: prerouting is not a raw-priority prerouting hook: {head}")
            pre = nft_chain_rules(listing, "prerouting") or []
            if pre[:1] != ["iifgroup 2 goto antispoof"]:
                problems.append(f"{family}: prerouting does not send group 2 to antispoof first: {pre}")
            body = nft_chain_rules(listing, "antispoof") or []
            if (body[:1] != [f"iifname . {saddr} @allowed accept"] or body[-1] not in ("drop", "counter drop")
                    or any("accept" in rule for rule in body[1:])):
                problems.append(f"{family}: antispoof does not accept @allowed only, then drop: {body}")
            allowed = {e["concat"][1] for e in nft_set(ns, family, "allowed") if e["concat"][0] == vif}
            if allowed != own:
                problems.append(f"{family}: allowed lets {allowed} through instead of {own}")
            if missing := own - set(nft_set(ns, family, "downstream")):
                problems.append(f"{family}: downstream lacks {missing}")
        return problems
    return ipt_problems(ns, vif, {4: own4, 6: own6})
