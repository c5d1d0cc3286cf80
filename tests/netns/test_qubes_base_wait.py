"""On a VM whose base is Qubes' nftables one (its files in /etc/qubes), a vif
event uses nft also before the base is loaded: it waits a bounded time for the
base and never builds an iptables protection beside it (CONTRACT section 4).

The files are put in /etc/qubes of a private mount namespace (an overlay on
/etc, its upper layer a tmpfs); the event runs there and in the test's network
namespace, so a served event's child joins both, as it joins a client's."""

import shlex
import subprocess
import time

import pytest

from netns import BIN, run_libxl
from qubes_base import ANTISPOOF_NFT as ANTISPOOF

VIF, VM_IP, MAC, GATEWAY = "vif37.0", "10.137.7.27", "00:16:3e:5e:6c:19", "10.137.7.1"


def in_qubes_etc(tmp_path, argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace whose /etc has qubes/qubes-antispoof.nft
    and qubes/qubes-ipv4.nft (an overlay: the machine's /etc is not changed)."""
    layer = tmp_path / "etc-layer"
    layer.mkdir(exist_ok=True)
    script = " && ".join([
        f"mount -t tmpfs tmpfs {layer}",
        f"mkdir -p {layer}/upper/qubes {layer}/work",
        f"printf '%s' {shlex.quote(ANTISPOOF)} >{layer}/upper/qubes/qubes-antispoof.nft",
        f": >{layer}/upper/qubes/qubes-ipv4.nft",
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={layer}/upper,workdir={layer}/work /etc",
        'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


@pytest.fixture
def vif(netns, xen):
    proxy, vm = netns.make("proxy"), netns.make("app")
    netns.vif(proxy, vm, VIF, vm_mac=MAC, vm_addrs=(VM_IP,), gateway=GATEWAY)
    path = xen.backend(37, ip=VM_IP, mac=MAC)
    xen.qdb_write("/qubes-netvm-gateway", GATEWAY)
    return proxy, vm, path


def event(proxy, xen, path, tmp_path, action: str, **extra) -> subprocess.Popen:
    """The event as xl devd runs it (env -i, stdin /dev/null), in the Qubes-style /etc."""
    argv = xen.libxl(VIF, path, **extra) + [str(BIN / "vif-route-qubes"), action, "type_if=vif"]
    return subprocess.Popen(in_qubes_etc(tmp_path, ["ip", "netns", "exec", proxy.name, *argv]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def protection(proxy) -> dict[str, str]:
    return {"ipsets": proxy.sh("ipset list -n", check=False).stdout.strip(),
            "raw": "\n".join(line for line in proxy.out("iptables-save -t raw").splitlines()
                             if not line.startswith("#")),
            "nft": proxy.sh("nft list table ip qubes", check=False).stdout}


def test_before_the_base_the_event_fails_cleanly_after_its_wait(vif, xen, tmp_path):
    proxy, vm, path = vif
    before = protection(proxy)
    link_before = proxy.out(f"ip -br link show dev {VIF}")
    proc = event(proxy, xen, path, tmp_path, "online", VIF_ROUTE_BASE_WAIT="0.5")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and VIF in lines[0] and "qubes-antispoof.service" in lines[0], err
    # Nothing was built: no ipsets, no iptables rules, no nft table; the link stays down.
    assert protection(proxy) == before and before["ipsets"] == "" and before["nft"] == ""
    assert proxy.out(f"ip -br link show dev {VIF}") == link_before and "DOWN" in link_before
    assert xen.xs_read(f"/local/domain/0/{path}/hotplug-status") == "error"


def test_the_event_waits_for_the_base_and_then_fills_its_sets(vif, xen, tmp_path):
    proxy, vm, path = vif
    proc = event(proxy, xen, path, tmp_path, "online", VIF_ROUTE_BASE_WAIT="20")
    time.sleep(1.0)  # the event is waiting now (a slow start only makes the base come earlier)
    assert proc.poll() is None, proc.communicate()
    proxy.sh(f"nft -f - <<'EOF'\n{ANTISPOOF}\nEOF")  # qubes-antispoof.service, late
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    state = protection(proxy)
    assert state["ipsets"] == "" and "-A " not in state["raw"]  # no iptables protection beside the base
    assert f'"{VIF}" . {VM_IP}' in state["nft"] and VM_IP in state["nft"]
    assert xen.xs_read(f"/local/domain/0/{path}/hotplug-status") == "connected"
    # The VM's traffic passes the base's anti-spoofing: its gateway answers.
    vm.sh(f"ping -c 1 -W 5 {GATEWAY}")
    proc = event(proxy, xen, path, tmp_path, "offline")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert VIF not in protection(proxy)["nft"]


def test_without_qubes_files_the_choice_is_unchanged(vif, xen):
    """Outside Qubes (no /etc/qubes), auto with no table picks iptables as before."""
    proxy, vm, path = vif
    result = run_libxl(proxy, xen, [str(BIN / "vif-route-qubes"), "online", "type_if=vif"], VIF, path)
    assert result.returncode == 0, result.stderr
    assert "qbs-allowed4" in protection(proxy)["ipsets"]
