"""The index of the dispatch chain's rules (vif_route_qubes/raw_index.py, issue "Speed").

An event reads only its own rules of QBS-ANTISPOOF when the index was
written at the current nftables generation.  It must agree with a full read;
a change made by anyone else must make the next event read everything again
(and so repair what it finds); and an index that lists the wrong rules must
never make an event touch another VM's rules.
"""

import json
from pathlib import Path

from hypothesis import given, settings, strategies as st

from netns import BIN, run_cmd
from test_idempotence import add_vm, hotplug, make_provider, ok
from test_ipt_netlink import online_three

READER = """
import json, sys
from vif_route_qubes import ipt_netlink, raw_index
vif, lock = sys.argv[1], sys.argv[2]
session = raw_index.open_session(lock)
trusted = session.trusted
indexed = ipt_netlink.read_raw(vif, session)
trusted = trusted and session.spared  # not sent back to a full read
session.close()
full = ipt_netlink.read_raw(vif)
# other vifs' rules are placeholders: one stands for any number of them
shape = lambda states: [[sorted(s.chains), sorted([c, sorted(set(r))] for c, r in s.rules)] for s in states]
print(json.dumps({"trusted": trusted, "indexed": shape(indexed), "full": shape(full)}))
"""


def index_file(xen) -> Path:
    files = list(Path(str(xen.lock)[: -len(".lock")] + ".d").glob("raw-index-*"))
    assert len(files) == 1, files
    return files[0]


def dispatch_lines(proxy, family=4) -> list[str]:
    save = "ip6tables-save" if family == 6 else "iptables-save"
    return [line for line in proxy.out(f"{save} -t raw").splitlines() if line.startswith("-A QBS-ANTISPOOF ")]


def test_what_the_index_reads_is_what_a_full_read_sees(netns, xen, vifcmd):
    proxy, vms = online_three(netns, xen, vifcmd)
    for vif, _ in vms:
        result = ok(run_cmd(proxy, [str(BIN / "python"), "-c", READER, vif, str(xen.lock)], xen.env()))
        seen = json.loads(result.stdout)
        assert seen["trusted"], "the index written by the last event was not used"
        assert seen["indexed"] == seen["full"]
    assert "vif137.0 4:" in index_file(xen).read_text()


def test_a_rule_added_by_hand_is_found_and_repaired(netns, xen, vifcmd):
    """iptables run by hand bumps the generation: the next online reads the
    whole chain again and deletes the duplicate, as it did without an index."""
    proxy, vms = online_three(netns, xen, vifcmd)
    vif, path = vms[1]
    before = dispatch_lines(proxy)
    mine = [line for line in before if f'"{vif}"' in line]
    proxy.sh("iptables -t raw " + mine[-1].replace("-A ", "-I ", 1).replace('"', "'"))
    assert len(dispatch_lines(proxy)) == len(before) + 1
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
    after = dispatch_lines(proxy)
    assert sorted(after) == sorted(before)


def swap_entries(path: Path, one: str, other: str) -> None:
    """Make the index list `one`'s rules as `other`'s and the other way round."""
    lines = path.read_text().splitlines()
    entries = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines[2:]}
    entries[one], entries[other] = entries[other], entries[one]
    path.write_text("\n".join(lines[:2] + [f"{tag} {rest}" for tag, rest in entries.items()]) + "\n")


def test_an_index_listing_other_rules_never_touches_them(netns, xen, vifcmd):
    """The index says vif37.0's rules are vif38.0's (and the other way round),
    at the current generation: every listed rule is read back and checked, so
    online and offline of vif37.0 still leave vif38.0's rules alone."""
    proxy, vms = online_three(netns, xen, vifcmd)
    theirs = [line for line in dispatch_lines(proxy) if '"vif38.0"' in line]
    vif, xpath = vms[0]
    for command in ("online", "offline"):
        swap_entries(index_file(xen), "vif37.0", "vif38.0")
        ok(hotplug(proxy, xen, vifcmd, command, vif, xpath, "iptables"))
        assert [line for line in dispatch_lines(proxy) if '"vif38.0"' in line] == theirs
    assert not [line for line in dispatch_lines(proxy) + dispatch_lines(proxy, 6) if '"vif37.0"' in line]


def test_a_folder_that_is_not_ours_alone_is_not_used(netns, xen, vifcmd):
    proxy = make_provider(netns)
    folder = Path(str(xen.lock)[: -len(".lock")] + ".d")
    folder.mkdir(mode=0o700)
    folder.chmod(0o777)  # anyone could write an index here
    vif, path = add_vm(netns, xen, proxy, 37)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
    assert list(folder.iterdir()) == []
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, "iptables"))
    assert "vif37.0" not in proxy.out("iptables-save -t raw")


def test_an_index_that_miscounts_the_chain_is_not_believed(netns, xen, vifcmd):
    """The index says vif37.0's rules are all the dispatch chain holds: offline
    would then delete the chain, which the kernel refuses while vif38.0's and
    vif137.0's rules are in it.  The kernel's count of the chain's rules and
    jumps gives the index away, and the whole chain is read instead."""
    proxy, vms = online_three(netns, xen, vifcmd)
    path = index_file(xen)
    lines = path.read_text().splitlines()
    gen = lines[1].split(" ")[1]
    own = dict(part.split(":") for part in next(line for line in lines if line.startswith("vif37.0 ")).split(" ")[1:])
    lines[1] = f"gen {gen} 4:{len(own['4'].split(','))} 6:{len(own['6'].split(','))}"
    path.write_text("\n".join(lines) + "\n")
    theirs = [line for line in dispatch_lines(proxy) if '"vif37.0"' not in line]
    vif, xpath = vms[0]
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, xpath, "iptables"))
    assert dispatch_lines(proxy) == theirs


def test_the_offline_of_the_last_vif_leaves_no_index(netns, xen, vifcmd):
    proxy = make_provider(netns)
    vif, path = add_vm(netns, xen, proxy, 37)
    ok(hotplug(proxy, xen, vifcmd, "online", vif, path, "iptables"))
    written = index_file(xen)
    assert "vif37.0 4:" in written.read_text()
    ok(hotplug(proxy, xen, vifcmd, "offline", vif, path, "iptables"))
    assert list(written.parent.iterdir()) == []


TAGS = st.sampled_from(["vif1.0", "vif11.0", "vif1.1", "vif137.0", "-", "x"])
OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "clear", "save"]), TAGS, st.sampled_from([4, 6]),
                         st.integers(1, 40)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_index_file_says_what_was_done_to_it(ops):
    """Index against a plain dict model, through add, remove, clear and a
    write and read of its text at any point (vif1.0 is a prefix of vif11.0)."""
    from vif_route_qubes.raw_index import Index

    index, model = Index(1, {4: 0, 6: 0}), {4: {}, 6: {}}
    for op, tag, version, handle in ops:
        if op == "add":
            assert index.add(tag, version, handle) == (handle not in model[version].get(tag, set()))
            model[version].setdefault(tag, set()).add(handle)
        elif op == "remove":
            assert index.remove(tag, version, handle) == (handle in model[version].get(tag, set()))
            model[version].get(tag, set()).discard(handle)
        elif op == "clear":
            index.clear(version)
            model[version] = {}
        else:
            index = Index.parse(index.text())
    index = Index.parse(index.text())
    for version in (4, 6):
        total = sum(len(handles) for handles in model[version].values())
        assert index.counts[version] == total
        for tag in ["vif1.0", "vif11.0", "vif1.1", "vif137.0", "-", "x", "if1.0"]:
            mine = model[version].get(tag, set())
            assert sorted(index.handles(tag, version)) == sorted(mine)
            assert index.others(tag, version) == total - len(mine)
