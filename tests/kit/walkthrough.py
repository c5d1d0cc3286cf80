"""The three-hop walk-through as network namespaces, for the tests and the demo.

Two layouts.  "seed": each hop's virtual DNS addresses are its own gateway
and a second address (the seed's older Qubes scheme), as below.  "r4": as
Qubes R4 does it, every VM's virtual DNS addresses are 10.139.1.1 and
10.139.1.2 in both providers' qubesdb, and the ProxyVM's own resolv.conf names
those same addresses, so the ProxyVM DNATs them to themselves and the NetVM
translates them to the real resolver.

    app (AppVM, eth0 10.137.7.27)
      -> proxy (ProxyVM: vif37.0 gateway 10.137.7.1; eth0 10.137.1.26)
      -> net (NetVM: vif5.0 gateway 10.137.1.1; eth0 192.0.2.2/24)
      -> upstream (eth0 192.0.2.1/24; on lo the host 198.51.100.1 with a UDP
         recorder, and dnsmasq on 203.0.113.53 and on 203.0.113.54)

Each VM has its own qubesdb, resolv.conf, lock file, hooks folder and
systemctl log; xenstore is shared, as on a real host.  The VMs are brought up
the way the system does it: `init`, the Xen hotplug form of `online` per vif,
then `qubes-setup-dnat-to-ns`, all with one firewall backend (`firewall`:
`init --backend F`, and QUBES_NET_BACKEND=F for every command).  close()
kills what was started and deletes every namespace; callers call it from
`finally`.
"""

import subprocess
import sys
import time
from pathlib import Path

from netns import Namespace, Namespaces, XenEnv
from walkvm import HERE, PROG_BIN, VM, BringUpError, Flow  # noqa: F401  (PROG_BIN, Flow: for the demo)

APP_IP, APP_MAC, APP_DOMID = "10.137.7.27", "00:16:3e:5e:6c:19", 37
APP2_IP, APP2_MAC, APP2_DOMID = "10.137.7.28", "00:16:3e:5e:6c:1a", 38
PROXY_GW, PROXY_DNS2 = "10.137.7.1", "10.137.7.254"
PROXY_IP, PROXY_MAC, PROXY_DOMID = "10.137.1.26", "00:16:3e:5e:6c:18", 5
NET_GW, NET_DNS2, NET_DOMID = "10.137.1.1", "10.137.1.254", 1
NET_UPLINK, UPSTREAM_GW = "192.0.2.2", "192.0.2.1"
HOST, ECHO_PORT = "198.51.100.1", 7777
DNS_A, DNS_B = "203.0.113.53", "203.0.113.54"
ANSWER = {DNS_A: "198.51.100.53", DNS_B: "198.51.100.54"}  # each server answers NAME its own way
NAME = "walk.test"
R4_DNS1, R4_DNS2 = "10.139.1.1", "10.139.1.2"
LAYOUTS = ("seed", "r4")
# ipv6=True: every hop dual-stack, as Qubes does it (fd09:24ef:4179:: + the IPv4 address)
APP6, PROXY_GW6 = "fd09:24ef:4179::a89:71b", "fd09:24ef:4179::a89:701"
APP2_6 = "fd09:24ef:4179::a89:71c"
PROXY6, NET_GW6 = "fd09:24ef:4179::a89:11a", "fd09:24ef:4179::a89:101"
NET_UPLINK6, UPSTREAM_GW6 = "2001:db8::2", "2001:db8::1"
DNS6_A = "2001:db8:53::53"  # not on the uplink /64: reached through the default route
VDNS6 = ("fd09:24ef:4179::a8b:1", "fd09:24ef:4179::a8b:2")
ANSWER6 = {DNS6_A: ("198.51.100.56", "2001:db8::56")}  # its A and AAAA answers for NAME
AAAA = {DNS_A: "2001:db8::5:53", DNS_B: "2001:db8::5:54"}  # the IPv4 servers' AAAA answers


class Walkthrough:
    def __init__(self, root: Path, say=None, firewall: str = "iptables", layout: str = "seed",
                 ipv6: bool = False) -> None:
        assert layout in LAYOUTS, layout
        self.layout, self.ipv6 = layout, ipv6
        self.root = Path(root)
        self.say = say or (lambda text: None)
        self.firewall = firewall  # the backend every VM's commands use
        self.spaces = Namespaces()
        self.procs: list[tuple[str, subprocess.Popen]] = []  # (namespace, process) we started
        self.xenstore = self.root / "xenstore"
        self.xenstore.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Walkthrough":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- building ---------------------------------------------------------------

    @property
    def app_dns(self) -> tuple[str, str]:
        """The AppVM's two virtual DNS addresses."""
        return (R4_DNS1, R4_DNS2) if self.layout == "r4" else (PROXY_GW, PROXY_DNS2)

    @property
    def net_dns(self) -> tuple[str, str]:
        """The virtual DNS addresses the NetVM translates."""
        return (R4_DNS1, R4_DNS2) if self.layout == "r4" else (NET_GW, NET_DNS2)

    def _vm(self, label: str, domid: int, gateway: str, dns: tuple[str, str], *resolvers: str,
            gateway6: str = "") -> VM:
        xen = XenEnv(self.root / label)
        xen.xenstore = self.xenstore  # one xenstore per host, one qubesdb per VM
        vm = VM(label, self.spaces.make(label), xen, domid, self.firewall)
        keys = [("/qubes-netvm-gateway", gateway), ("/qubes-netvm-primary-dns", dns[0]),
                ("/qubes-netvm-secondary-dns", dns[1])]
        if self.ipv6:
            keys += [("/qubes-netvm-gateway6", gateway6), ("/qubes-netvm-primary-dns6", VDNS6[0]),
                     ("/qubes-netvm-secondary-dns6", VDNS6[1])]
        for key, value in keys:
            xen.qdb_write(key, value)
        vm.set_resolv(*(f"nameserver {r}" for r in resolvers))
        return vm

    def backend(self, vm: VM, domid: int, ip: str, mac: str) -> str:
        """The keys Xen's toolstack writes for a vif in `vm`; returns its XENBUS_PATH."""
        path = f"/local/domain/{vm.domid}/backend/vif/{domid}/0"
        for key, value in (("ip", ip), ("mac", mac), ("type", "vif")):
            vm.xen.xs_write(f"{path}/{key}", value)
        return path

    def step(self, vm: VM, what: str, result: subprocess.CompletedProcess, expect=(0,)) -> None:
        self.say(f"  [{vm.label:<5}] {what:<62} exit {result.returncode}")
        if result.returncode not in expect:
            raise BringUpError(f"{vm.label}: {what} exited {result.returncode} (expected {expect}): "
                               f"{(result.stderr or result.stdout).strip()}")

    def build(self) -> "Walkthrough":
        sp = self.spaces
        v6 = self.ipv6
        self.net = self._vm("net", NET_DOMID, NET_GW, self.net_dns, DNS_A, *([DNS6_A] if v6 else []),
                            gateway6=NET_GW6)
        # The ProxyVM's resolv.conf names what its NetVM gave it as DNS.
        self.proxy = self._vm("proxy", PROXY_DOMID, PROXY_GW, self.app_dns, *self.net_dns,
                              *(VDNS6 if v6 else ()), gateway6=PROXY_GW6)
        self.app = sp.make("app")
        self.upstream = sp.make("upstream")
        # Xen creates the vifs down and un-configured; the VM side configures itself.
        proxy_addrs, app_addrs = (PROXY_IP, PROXY6) if v6 else (PROXY_IP,), (APP_IP, APP6) if v6 else (APP_IP,)
        sp.vif(self.net.ns, self.proxy.ns, "vif5.0", vm_mac=PROXY_MAC, vm_addrs=proxy_addrs, gateway=NET_GW)
        sp.vif(self.proxy.ns, self.app, "vif37.0", vm_mac=APP_MAC, vm_addrs=app_addrs, gateway=PROXY_GW)
        sp.link(self.net.ns, "eth0", self.upstream, "eth0")
        self.net.ns.sh(f"ip addr add {NET_UPLINK}/24 dev eth0 && ip route add default via {UPSTREAM_GW}")
        self.upstream.sh(f"ip addr add {UPSTREAM_GW}/24 dev eth0 && ip addr add {HOST}/32 dev lo"
                         f" && ip addr add {DNS_A}/32 dev lo && ip addr add {DNS_B}/32 dev lo")
        if v6:
            for ns, gw6 in ((self.proxy.ns, NET_GW6), (self.app, PROXY_GW6)):
                ns.sh(f"ip -6 route add {gw6} dev eth0 && ip -6 route add default via {gw6} dev eth0")
            self.net.ns.sh(f"ip -6 addr add {NET_UPLINK6}/64 dev eth0 nodad"
                           f" && ip -6 route add default via {UPSTREAM_GW6}")
            self.upstream.sh(f"ip -6 addr add {UPSTREAM_GW6}/64 dev eth0 nodad && ip -6 addr add {DNS6_A}/128 dev lo")
        self.xb_net = self.backend(self.net, PROXY_DOMID, " ".join(proxy_addrs), PROXY_MAC)
        self.xb_proxy = self.backend(self.proxy, APP_DOMID, " ".join(app_addrs), APP_MAC)
        self.say(f"  namespaces: app={self.app.name} proxy={self.proxy.ns.name} "
                 f"net={self.net.ns.name} upstream={self.upstream.name}")
        self._start_upstream()

        for vm in (self.net, self.proxy):
            self.step(vm, f"vif-route-qubes init --backend {self.firewall}", vm.init())
        for vm, vif, xb in ((self.net, "vif5.0", self.xb_net), (self.proxy, "vif37.0", self.xb_proxy)):
            self.step(vm, f"vif={vif} vif-route-qubes online type_if=vif", vm.hotplug("online", vif, xb))
            status = vm.xen.xs_read(f"{xb}/hotplug-status")
            if status != "connected":
                raise BringUpError(f"{vm.label}: {xb}/hotplug-status is {status!r}, not 'connected'")
            self.wait_dad(vm.ns, vif)
        for vm in (self.net, self.proxy):
            self.step(vm, "qubes-setup-dnat-to-ns (first run must change the rules)", vm.dnat())
        return self

    def wait_dad(self, ns: Namespace, dev: str, limit: float = 5.0) -> None:
        """Until the vif's IPv6 gateway has passed duplicate address detection, the
        provider answers no neighbour solicitation for it."""
        deadline = time.monotonic() + limit
        while self.ipv6 and ns.out(f"ip -6 addr show dev {dev} tentative").strip():
            if time.monotonic() > deadline:
                raise BringUpError(f"{dev}: an IPv6 address stays tentative")
            time.sleep(0.05)

    def servers(self) -> dict[str, tuple[str, str]]:
        """Each upstream DNS server and its (A, AAAA) answers for NAME."""
        out = {server: (answer, AAAA[server]) for server, answer in ANSWER.items()}
        return {**out, **ANSWER6} if self.ipv6 else out

    def _start_upstream(self) -> None:
        for server, (answer, answer6) in self.servers().items():
            tag = self.dns_log(server).stem
            argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                    "--bind-interfaces", f"--listen-address={server}", f"--address=/{NAME}/{answer}",
                    f"--address=/{NAME}/{answer6}", f"--pid-file={self.root / f'{tag}.pid'}", "--log-queries",
                    f"--log-facility={self.dns_log(server)}"]
            self.start(self.upstream, argv, self.root / f"{tag}.err")
        self.echo_log = self.start_echo(self.upstream, HOST, ECHO_PORT)
        for server, (answer, _) in self.servers().items():  # ready when it answers from its own namespace
            deadline = time.monotonic() + 10
            while self.dns(self.upstream, server, timeout=0.3)[0] != answer:
                if time.monotonic() > deadline:
                    raise BringUpError(f"dnsmasq on {server} does not answer; see {self.root}")
        self.say(f"  [upstr] dnsmasq on {DNS_A} ({NAME} = {ANSWER[DNS_A]}) and {DNS_B} "
                 f"({NAME} = {ANSWER[DNS_B]}); UDP recorder on {HOST}:{ECHO_PORT}")

    def dns_log(self, server: str) -> Path:
        return self.root / f"dnsmasq-{server.replace(':', '-').rsplit('.', 1)[-1]}.log"

    # ---- processes --------------------------------------------------------------

    def start(self, ns: Namespace, argv: list[str], output: Path) -> subprocess.Popen:
        with open(output, "w") as out:
            proc = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((ns.name, proc))
        return proc

    def start_echo(self, ns: Namespace, address: str, port: int) -> Path:
        """A UDP recorder at address:port in ns; returns its log (one "src port" line per datagram)."""
        log = self.root / f"udp-{address}-{port}.log"
        log.unlink(missing_ok=True)
        proc = self.start(ns, [sys.executable, str(HERE / "udpecho.py"), "serve", address, str(port), str(log)],
                          self.root / f"udp-{address}-{port}.err")
        deadline = time.monotonic() + 5
        while not log.exists():  # it creates the log once bound
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BringUpError(f"the UDP recorder on {address}:{port} did not start")
            time.sleep(0.02)
        return log

    def stop_in(self, ns_name: str | None = None) -> None:
        """Stop the processes we started (in one namespace, or all)."""
        for entry in [e for e in self.procs if ns_name in (None, e[0])]:
            proc = entry[1]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
            self.procs.remove(entry)

    def close(self) -> None:
        try:
            self.stop_in(None)
        finally:
            self.spaces.cleanup()

    # ---- a second AppVM ---------------------------------------------------------

    def add_app(self, domid: int, ip: str, mac: str, ip6: str = "") -> tuple[Namespace, str, str]:
        """Another AppVM behind the ProxyVM, brought up by the hotplug form; (ns, vif, XENBUS_PATH)."""
        ns = self.spaces.make(f"a{domid}")
        vif = f"vif{domid}.0"
        addrs = (ip, ip6) if ip6 else (ip,)
        self.spaces.vif(self.proxy.ns, ns, vif, vm_mac=mac, vm_addrs=addrs, gateway=PROXY_GW)
        if ip6:
            ns.sh(f"ip -6 route add {PROXY_GW6} dev eth0 && ip -6 route add default via {PROXY_GW6} dev eth0")
        xb = self.backend(self.proxy, domid, " ".join(addrs), mac)
        self.step(self.proxy, f"vif={vif} vif-route-qubes online type_if=vif", self.proxy.hotplug("online", vif, xb))
        self.wait_dad(self.proxy.ns, vif)
        return ns, vif, xb

    def remove_app(self, ns: Namespace, vif: str, xb: str) -> subprocess.CompletedProcess:
        """As on shutdown: the VM (and with it the vif) goes away, then Xen's offline event runs."""
        self.stop_in(ns.name)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)
        self.spaces.made.remove(ns)
        return self.proxy.hotplug("offline", vif, xb)

    # ---- probes (each runs inside a namespace) ----------------------------------

    def dns(self, ns: Namespace, server: str, tcp: bool = False, timeout: float = 2.0, aaaa: bool = False,
            connected: bool = False) -> tuple[str | None, str]:
        """(A (or AAAA) address of NAME or None, outcome text) as asked from ns."""
        argv = ["ip", "netns", "exec", ns.name, sys.executable, str(HERE / "dnsq.py"),
                *(["--tcp"] if tcp else []), *(["--aaaa"] if aaaa else []),
                *(["--connected"] if connected else []), "--timeout", str(timeout), server, NAME]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 15)
        outcome = result.stdout.strip() or result.stderr.strip()
        return (outcome if result.returncode == 0 else None), outcome

    def udp_send(self, ns: Namespace, address: str, port: int, timeout: float = 2.0) -> str | None:
        """The recorder's answer ("seen SRC:PORT") or None when nothing came back."""
        argv = ["ip", "netns", "exec", ns.name, sys.executable, str(HERE / "udpecho.py"), "send", address,
                str(port), str(timeout)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 15)
        return result.stdout.strip() if result.returncode == 0 else None

    def ping(self, ns: Namespace, address: str, timeout: int = 2) -> subprocess.CompletedProcess:
        return ns.sh(f"ping -c 1 -W {timeout} {address}", check=False, timeout=timeout + 15)

    def flows(self, ns: Namespace) -> list[Flow]:
        text = ns.sh("conntrack -L", timeout=15).stdout
        return [flow for flow in map(Flow.parse, text.splitlines()) if flow]
