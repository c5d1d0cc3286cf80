"""What a mapped vif's event reads (plan/mapped.py plans it): whether its
namespace exists, whether the Xen vif is inside it already, and whether we
run in a mount namespace of our own."""

import os

from vif_route_qubes.model import VifInputs
from vif_route_qubes.plan.mapped import MappedFacts, netns_name
from vif_route_qubes.system import ip


def _private_mounts() -> bool:
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def read_facts(inp: VifInputs) -> MappedFacts:
    name = netns_name(inp)
    if not os.path.exists(f"/run/netns/{name}"):
        return MappedFacts(False, False, _private_mounts())
    try:
        found = ip.link_in_netns(name, inp.vif)
    except OSError:
        found = False  # a namespace file that is no namespace: nothing of ours inside
    return MappedFacts(True, found, _private_mounts())
