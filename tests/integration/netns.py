"""Network namespaces for hostile-network tests.

Each test builds its own small network out of namespaces joined by veth pairs
(controller, router, agent, ...), addressed only inside 10.200.0.0/16 and
fd00::/8 ULAs, and deletes every namespace it made when it ends, also when it
fails. Nothing is added to the host's own namespace: veth pairs are created
directly inside the test's namespaces. Tests are skipped with a clear message
where namespaces cannot be created (not root, no CAP_NET_ADMIN, no iproute2).

Processes run inside a namespace through `ip netns exec`, which keeps the
filesystem (binaries, the nix store, the test's temporary directory). Sockets
the test process itself needs inside a namespace come from `Net.socket`, which
creates them on a helper thread that has joined the namespace (a socket stays
in the namespace it was created in).
"""
import ctypes
import itertools
import os
import re
import shutil
import socket
import subprocess
import threading

from harness import Env, Process, binary, wait_until

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
_unavailable = None
PREFIX = "muster"


def _ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def unavailable_reason():
    """None when this process can create network namespaces, else why not."""
    global _unavailable
    if _unavailable is not None:
        return _unavailable or None
    reason = ""
    if os.geteuid() != 0:
        reason = "network namespace tests need root (CAP_NET_ADMIN and mount rights); run as root"
    else:
        for tool in ("ip", "iptables", "sysctl"):
            if shutil.which(tool) is None:
                reason = f"'{tool}' is not installed (scripts/install-deps.sh installs it)"
                break
    if not reason:
        probe = f"{PREFIX}{os.getpid()}probe"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            reason = f"cannot create a network namespace: {r.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    _unavailable = reason
    return reason or None


def _reap_stale():
    """Deletes namespaces left behind by an earlier test process that was killed."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)x\d+-\w+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", name, check=False)


class Net:
    """The namespaces of one test. Create it inside the test method: it skips
    the test when namespaces are unavailable and deletes them on cleanup."""

    def __init__(self, test):
        reason = unavailable_reason()
        if reason:
            test.skipTest(reason)
        _reap_stale()
        self.prefix = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self.namespaces = []
        test.addCleanup(self.close)

    # ------------------------------------------------------------ building
    def ns(self, short):
        name = f"{self.prefix}-{short}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, ns_a, if_a, ns_b, if_b):
        """A veth pair with one end in each namespace, both up."""
        _ip("link", "add", "name", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b)
        _ip("-n", ns_a, "link", "set", if_a, "up")
        _ip("-n", ns_b, "link", "set", if_b, "up")

    def addr(self, ns, ifname, cidr):
        extra = ["nodad"] if ":" in cidr else []  # no duplicate address detection delay
        _ip("-n", ns, "addr", "add", cidr, "dev", ifname, *extra)

    def route(self, ns, *args):
        if any(":" in a for a in args):
            _ip("-n", ns, "-6", "route", "add", *args)
        else:
            _ip("-n", ns, "route", "add", *args)

    def run(self, ns, *argv, check=True):
        r = subprocess.run(self.exec_argv(ns, list(argv)), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"in {ns}: {' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sysctl(self, ns, key, value):
        self.run(ns, "sysctl", "-qw", f"{key}={value}")

    def iptables(self, ns, *args, v6=False):
        self.run(ns, "ip6tables" if v6 else "iptables", "-w", *args)

    def exec_argv(self, ns, argv):
        return ["ip", "netns", "exec", ns, *argv]

    # ------------------------------------------------------------- sockets
    def socket(self, ns, family=socket.AF_INET, type=socket.SOCK_STREAM):
        """A socket created inside namespace `ns`."""
        out = {}

        def make():
            try:
                fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
                finally:
                    os.close(fd)
                out["sock"] = socket.socket(family, type)
            except Exception as e:  # handed to the caller
                out["error"] = e

        t = threading.Thread(target=make)  # the thread dies with the namespace switch
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["sock"]

    def can_connect(self, ns, host, port, timeout=2.0):
        """True when a TCP connection from `ns` to host:port is established."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.socket(ns, fam)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    # ------------------------------------------------------------- teardown
    def close(self):
        for name in reversed(self.namespaces):
            _ip("netns", "del", name, check=False)
        self.namespaces = []


def nat_topology(net, masquerade=True):
    """controller ns 10.200.1.1 — router 10.200.1.2 | 10.200.2.1 — agent ns 10.200.2.2.

    The agent's default route goes through the router. With `masquerade`, the
    router rewrites the agent's connections to its own address 10.200.1.2 and
    forwards nothing new from the controller side to the agent side: the agent
    has no inbound path (the controller's namespace even gets a route to the
    agent's subnet, so that it is the NAT, not a missing route, that stops it).
    Returns (ctl_ns, router_ns, agent_ns)."""
    ctl, rtr, agt = net.ns("ctl"), net.ns("rtr"), net.ns("agt")
    net.link(ctl, "eth0", rtr, "wan")
    net.link(agt, "eth0", rtr, "lan")
    net.addr(ctl, "eth0", "10.200.1.1/24")
    net.addr(rtr, "wan", "10.200.1.2/24")
    net.addr(rtr, "lan", "10.200.2.1/24")
    net.addr(agt, "eth0", "10.200.2.2/24")
    net.route(agt, "default", "via", "10.200.2.1")
    net.route(ctl, "10.200.2.0/24", "via", "10.200.1.2")
    net.sysctl(rtr, "net.ipv4.ip_forward", 1)
    if masquerade:
        net.iptables(rtr, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
        net.iptables(rtr, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
        net.iptables(rtr, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
        net.iptables(rtr, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack",
                     "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        net.iptables(rtr, "-A", "FORWARD", "-j", "DROP")
    return ctl, rtr, agt


class NetEnv(Env):
    """An Env whose controller (and CLI) run inside namespace `ns`, listening
    on `listen` (e.g. "10.200.1.1" or "[::]"), reached by agents at `host`."""

    def __init__(self, test_name, net, ns, listen, host, port=7443):
        super().__init__(test_name)
        self.net = net
        self.ns = ns
        self.listen_host = listen
        self.host = host
        self.port = port

    def url(self, port=None):
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{h}:{port or self.port}"

    def start_controller(self, extra=(), port=None):
        log = os.path.join(self.root, "controller.log")
        before = 0
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                before = f.read().count("listening on ")
        self.controller = Process(self.net.exec_argv(self.ns, [
            binary("muster-controller"), "run", "--state-dir", self.ctl_dir,
            "--listen", f"{self.listen_host}:{self.port}", *extra]), log)
        wait_until(lambda: self.controller.text().count("listening on ") > before or
                   not self.controller.alive(), 30, what="controller listening")
        if not self.controller.alive():
            raise AssertionError(f"controller exited:\n{self.controller.text()}")
        self.write_cli_config()
        return self.controller

    def cli(self, *args, check=True, timeout=120, key=None):
        argv = [binary("muster"), "--config", os.path.join(self.cli_dir, "config.json")]
        if key:
            argv += ["--key", key]
        r = subprocess.run(self.net.exec_argv(self.ns, argv + list(args)), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"muster {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r


def start_agent_in(net, ns, agent):
    """Starts a harness Agent inside namespace `ns`."""
    agent.proc = Process(net.exec_argv(ns, [binary("muster-agent"), "--config", agent.config_path]),
                         os.path.join(agent.env.root, f"agent-{agent.name}.log"))
    return agent
