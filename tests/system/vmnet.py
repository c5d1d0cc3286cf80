"""The network around the booted container (CONTRACT section 6): the container's
own namespace is the network VM; veth pairs join it to namespaces made here.

    net = VMNet(box, namespaces)       namespaces: a tests/netns.Namespaces (its cleanup
                                       deletes them all, which also removes every veth)
    net.uplink() -> Namespace          "internet": eth0 of the VM 192.0.2.2/24, default route via
                                       192.0.2.1; there, HOST 198.51.100.1 and a dnsmasq on DNS
                                       203.0.113.53 answering NAME with ANSWER; the container's
                                       /etc/resolv.conf names DNS
    net.vif(domid, devid=0, ip=VM_IP, mac=VM_MAC) -> (Namespace, XENBUS_PATH)
                                       vifD.N in the container (down, MAC fe:ff:ff:ff:ff:ff, as Xen
                                       makes it), eth0 in the VM's namespace configured as a Qubes VM
                                       does (ip/32, default via GATEWAY); xenstore keys ip, mac, type
    net.qubesdb()                      the qubesdb keys of a network VM (gateway, virtual DNS)
    net.ask(vm, server, name) -> str   tests/kit/dnsq.py's answer from inside `vm`
"""

import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "kit"))
from netns import VIF_MAC, Namespace, Namespaces, sh  # noqa: E402

UPLINK_VM, UPLINK_GW = "192.0.2.2", "192.0.2.1"
HOST, DNS = "198.51.100.1", "203.0.113.53"
NAME, ANSWER = "upstream.vrq.test", "198.51.100.77"
GATEWAY, DNS1, DNS2 = "10.137.7.1", "10.139.1.1", "10.139.1.2"
VM_IP, VM_MAC = "10.137.7.27", "00:16:3e:5e:6c:19"
DNSQ = HERE.parent / "kit" / "dnsq.py"


class VMNet:
    def __init__(self, box, namespaces: Namespaces) -> None:
        self.box = box
        self.spaces = namespaces

    def _inside(self, cmd: str) -> None:
        """`ip ...` in the container's network namespace, with the host's ip."""
        sh(f"nsenter --net={self.box.netns} sh -c '{cmd}'")

    def _pair(self, other: Namespace, inside_name: str, other_name: str) -> None:
        tmp = f"s{uuid.uuid4().hex[:10]}"
        sh(f"ip link add {tmp} type veth peer name {tmp}p")
        sh(f"ip link set {tmp} netns {self.box.pid1}")
        sh(f"ip link set {tmp}p netns {other.name}")
        self._inside(f"ip link set {tmp} name {inside_name}")
        other.sh(f"ip link set {tmp}p name {other_name}")

    def uplink(self) -> Namespace:
        inet = self.spaces.make("inet")
        self._pair(inet, "eth0", "uplink")
        self._inside(f"ip addr add {UPLINK_VM}/24 dev eth0 && ip link set eth0 up && "
                     f"ip route add default via {UPLINK_GW}")
        inet.sh(f"ip addr add {UPLINK_GW}/24 dev uplink && ip link set uplink up && "
                f"ip addr add {HOST}/32 dev lo && ip addr add {DNS}/32 dev lo")
        inet.popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                    f"--listen-address={DNS}", f"--address=/{NAME}/{ANSWER}", "--pid-file=", "--user=root"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):  # dnsmasq answers (asked from its own namespace)
            if self.ask(inet, DNS, NAME, timeout=0.2) == ANSWER:
                break
        else:
            raise RuntimeError("dnsmasq in the internet namespace does not answer")
        self.box.write("/etc/resolv.conf", f"nameserver {DNS}\n")
        return inet

    def qubesdb(self) -> None:
        for key, value in (("/qubes-netvm-gateway", GATEWAY), ("/qubes-netvm-primary-dns", DNS1),
                           ("/qubes-netvm-secondary-dns", DNS2)):
            self.box.xen.qdb_write(key, value)

    def vif(self, domid: int, devid: int = 0, ip: str = VM_IP, mac: str = VM_MAC) -> tuple[Namespace, str]:
        vm = self.spaces.make(f"vm{domid}")
        self._pair(vm, f"vif{domid}.{devid}", "eth0")
        self._inside(f"ip link set vif{domid}.{devid} address {VIF_MAC}")
        vm.sh(f"ip link set eth0 address {mac} && ip addr add {ip}/32 dev eth0 && ip link set eth0 up && "
              f"ip route add {GATEWAY} dev eth0 && ip route add default via {GATEWAY} dev eth0")
        return vm, self.box.xen.backend(domid, devid, ip=ip, mac=mac)

    @staticmethod
    def ask(vm: Namespace, server: str, name: str = NAME, timeout: float = 2.0) -> str:
        out = subprocess.run(["ip", "netns", "exec", vm.name, sys.executable, str(DNSQ), "--timeout",
                              str(timeout), server, name], capture_output=True, text=True)
        return out.stdout.strip()
