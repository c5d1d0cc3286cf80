"""vif-route-qubes run as Xen really runs it (issue 13; CONTRACT section 1, "How it is
invoked"): by libxl's xl devd, `online type_if=vif` with XENBUS_PATH relative
(backend/vif/37/0, resolved by xenstore against this domain's home), libxl's
environment only, stdin /dev/null, no terminal.  The SIGKILL of such a run and its
rerun: tests/netns/test_faults.py, whose Box runs every event in this form.

    app eth0 10.137.7.27 (and 10.137.7.99, an address the VM does not own)
      --vif37.0-- proxy eth0 192.0.2.2 ---- 192.0.2.1 eth0 upstream
"""

import subprocess

import pytest

from faults_box import GW, PATH, UPSTREAM, VIF, VM_IP, VM_MAC, Box, one_line
from netns import VIF_MAC, run_cmd, run_libxl

RESOLVED = "/local/domain/0/backend/vif/37/0"  # where xenstored puts PATH for domain 0


@pytest.fixture
def box(netns, xen, vifcmd, backend):
    made = Box(netns, xen, vifcmd, backend)
    yield made
    made.close()


def xenstore_files(xen) -> dict[str, str]:
    return {p.name: p.read_text() for p in xen.xenstore.iterdir()}


# -- 1. online, then offline, as libxl runs them -------------------------------

def test_online_then_offline_as_libxl_runs_them(box):
    assert PATH == "backend/vif/37/0"
    result = box.run("online")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr

    proxy = box.proxy
    assert proxy.out(f"ip route show dev {VIF}").strip() == f"{VM_IP} scope link metric 32715"
    assert f"inet {GW}/32 scope global {VIF}" in proxy.out(f"ip -4 addr show dev {VIF}")
    assert proxy.out(f"ip neigh show dev {VIF} nud permanent").strip() == f"{VM_IP} lladdr {VM_MAC} PERMANENT"
    assert box.xen.xs_read(f"{RESOLVED}/hotplug-status") == "connected"
    # Up, with its anti-spoofing: the VM's own datagram arrives upstream, a spoofed one does not.
    assert box.assert_guarded("libxl-online")
    box.app.sh(f"ping -c 1 -W 2 {GW}")
    assert f"lladdr {VIF_MAC}" in box.app.out(f"ip neigh show {GW}")
    box.app.sh(f"ping -c 1 -W 2 -I {VM_IP} {UPSTREAM}")

    result = box.run("offline")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert box.leftovers() == []
    box.assert_state(box.base, "offline as libxl runs it left something")


# -- 2. failures in that form ------------------------------------------------

def test_a_bad_mac_is_reported_where_xenstore_resolves_the_path(box):
    box.xen.xs_write(f"{PATH}/mac", "zz:16:3e:5e:6c:19")
    result = box.run("online")
    assert result.returncode in (1, 2), result.stderr
    line = one_line(result)
    assert VIF in line and "zz:16:3e:5e:6c:19" in line, line
    assert box.xen.xs_read(f"{RESOLVED}/hotplug-status") == "error"
    assert box.xen.xs_read(f"{RESOLVED}/hotplug-error") in line
    assert box.state() == box.base and not box.link_up()


@pytest.mark.parametrize("path", ["backend/vif/38/0", "/local/domain/0/backend/vif/38/0",
                                  "backend/vif/37/1", "/local/domain/0/backend/vif/3/0"])
def test_another_devices_path_is_refused_and_nothing_is_written(box, path):
    # The path names a device that exists: another VM's vif, whose keys must stay as they are.
    box.xen.backend(38, ip="10.137.7.38", mac="00:16:3e:5e:6c:38")
    box.xen.backend(37, devid=1, ip="10.137.7.28", mac=VM_MAC)
    box.xen.backend(3, ip="10.137.7.3", mac="00:16:3e:5e:6c:03")
    store = xenstore_files(box.xen)
    result = run_libxl(box.proxy, box.xen, box.argv("online"), VIF, path, QUBES_NET_BACKEND=box.backend)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert path in line and VIF in line, line
    assert xenstore_files(box.xen) == store  # nothing written anywhere
    assert box.state() == box.base and not box.link_up()


# -- this domain's id, and check --all either way ------------------------------

def one_vm(netns, xen, backend="iptables"):
    proxy, vm = netns.make("proxy"), netns.make("app")
    netns.vif(proxy, vm, VIF, vm_mac=VM_MAC, vm_addrs=(VM_IP,), gateway=GW)
    xen.qdb_write("/qubes-netvm-gateway", GW)
    return proxy, vm, xen.backend(37, ip=VM_IP, mac=VM_MAC)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_a_driver_domain_with_its_own_id_and_check_all(netns, xen, vifcmd, form):
    """Domain 5 (a network VM): the relative path resolves to /local/domain/5/..., and
    `check --all` finds the vif's xenstore keys whichever form online was given."""
    xen.own_domid = 5
    proxy, vm, path = one_vm(netns, xen)
    assert xen.xs_read(f"/local/domain/5/{path}/mac") == VM_MAC
    if form == "absolute":
        path = f"/local/domain/5/{path}"
    result = run_libxl(proxy, xen, [vifcmd, "online", "type_if=vif"], VIF, path, QUBES_NET_BACKEND="iptables")
    assert result.returncode == 0, result.stderr
    assert xen.xs_read("/local/domain/5/backend/vif/37/0/hotplug-status") == "connected"
    assert xen.xs_read("/local/domain/0/backend/vif/37/0/hotplug-status") is None
    vm.sh(f"ping -c 1 -W 2 {GW}")

    def check_all():
        return run_cmd(proxy, [vifcmd, "check", "--all"], xen.env(QUBES_NET_BACKEND="iptables"))

    assert (check_all().returncode, check_all().stdout) == (0, "")
    # Only xenstore knows the MAC (the rules do not): a missing neighbour is named with it.
    proxy.sh(f"ip neigh del {VM_IP} dev {VIF}")
    result = check_all()
    assert result.returncode == 1 and f"{VIF}: neighbour {VM_IP} lladdr {VM_MAC} missing" in result.stdout, result


def test_no_path_at_all_as_udev_may_run_it(netns, xen, vifcmd, backend):
    """udev gives a RUN program the event's variables only: no PATH.  The tools
    (in sbin) are still found; no qubesdb-read there means options only."""
    proxy, _, _ = one_vm(netns, xen)
    env = ["env", "-i", f"QUBES_NET_BACKEND={backend}",
           *(f"{key}={value}" for key, value in xen.stand_ins().items())]
    argv = ["ip", "netns", "exec", proxy.name, *env, vifcmd, "online", VIF, VM_IP, "--mac", VM_MAC,
            "--gateway", GW]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert proxy.out(f"ip route show dev {VIF}").strip() == f"{VM_IP} scope link metric 32715"


# -- 4. hardening, as qubesdb says ---------------------------------------------

HARD = "/qubes-service/harden-network-interfaces"
# (sysctl, value before, value hardened): every one differs before, so each can fail.
SETTINGS = [(f"net.ipv4.conf.{VIF.replace('.', '/')}.{k}", before, after) for k, before, after in (
    ("accept_source_route", "1", "0"), ("accept_redirects", "1", "0"), ("secure_redirects", "1", "0"),
    ("send_redirects", "1", "0"), ("drop_unicast_in_l2_multicast", "0", "1"))] + [
    (f"net.ipv6.conf.{VIF.replace('.', '/')}.{k}", before, after) for k, before, after in (
        ("accept_source_route", "0", "-1"), ("accept_redirects", "1", "0"), ("accept_ra", "1", "0"),
        ("autoconf", "1", "0"), ("accept_dad", "1", "0"), ("drop_unsolicited_na", "0", "1"),
        ("drop_unicast_in_l2_multicast", "0", "1"))]
SYSTEM = [("net.ipv6.max_dst_opts_length", "8", "0"), ("net.ipv6.conf.all.accept_dad", "1", "0"),
          ("net.ipv4.conf.all.accept_redirects", "1", "0")]


def sysctls(proxy, names) -> dict[str, str]:
    shown = proxy.out("sysctl -n " + " ".join(names)).split()
    return dict(zip(names, shown))


@pytest.mark.parametrize("flag", ["1", "0", None, "yes"], ids=["1", "0", "absent", "garbage"])
def test_hardening_follows_the_qubesdb_flag(netns, xen, vifcmd, backend, flag):
    proxy, _, path = one_vm(netns, xen)
    everything = SETTINGS + SYSTEM
    proxy.sh("sysctl -qw " + " ".join(f"{name}={before}" for name, before, _ in everything))
    before = {name: value for name, value, _ in everything}
    assert sysctls(proxy, list(before)) == before
    if flag is not None:
        xen.qdb_write(HARD, flag)
    on = flag == "1"

    dry = run_libxl(proxy, xen, [vifcmd, "online", "type_if=vif", "--dry-run"], VIF, path,
                    QUBES_NET_BACKEND=backend)
    assert dry.returncode == 0, dry.stderr
    assert ("sysctl -q -w net.ipv4.conf.all.accept_redirects=0\n" in dry.stdout) == on
    result = run_libxl(proxy, xen, [vifcmd, "online", "type_if=vif"], VIF, path, QUBES_NET_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    hardened = {name: after for name, _, after in everything}
    assert sysctls(proxy, list(before)) == (hardened if on else before)
    if flag == "yes":  # a warning that names the key and the value; still off
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and HARD in lines[0] and "yes" in lines[0], result.stderr
    else:
        assert result.stderr == ""

    result = run_libxl(proxy, xen, [vifcmd, "offline", "type_if=vif"], VIF, path, QUBES_NET_BACKEND=backend)
    assert result.returncode == 0, result.stderr
    # Offline leaves the system-wide settings: other vifs rely on them.
    system = [name for name, _, _ in SYSTEM]
    assert sysctls(proxy, system) == {name: (hardened if on else before)[name] for name in system}
