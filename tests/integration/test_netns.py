"""Hostile networks: an agent behind NAT, an IPv6 ULA overlay, a silently
blackholed path and a NAT that forgets idle connections. Every test builds its
own network namespaces (see netns.py), runs the real controller, CLI and agent
inside them and deletes them afterwards; skipped where namespaces are unavailable."""
import json
import os
import re
import subprocess
import sys
import time
import unittest

from harness import EnvTest, binary, nix_env, wait_until
from netns import Net, NetEnv, nat_topology, start_agent_in

PORT = 7443


def note(msg):
    """Figures worth seeing in the test output (reconnect times and the like)."""
    sys.stderr.write(f"\n    [{msg}] ")


class NetTest(EnvTest):
    def setUp(self):
        self.net = Net(self)  # skips the test when namespaces are unavailable
        self.env = None
        self.addCleanup(self._cleanup)

    def _cleanup(self):
        if self.env is not None:
            super()._cleanup()

    def make_env(self, ns, listen, host, extra=()):
        self.env = NetEnv(self._testMethodName, self.net, ns, listen, host, PORT)
        self.env.init_controller()
        self.env.start_controller(extra)
        return self.env

    def vars_dir(self, name, content):
        d = os.path.join(self.env.root, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "key.txt"), "w") as f:
            f.write(content)
        return d

    def wait_log_after(self, proc, pattern, start, timeout):
        """Waits for `pattern` in proc's log after character offset `start`;
        returns the monotonic time it was first seen."""
        rx = re.compile(pattern)
        wait_until(lambda: rx.search(proc.text(), start), timeout, interval=0.05,
                   what=f"/{pattern}/ in {proc.log_path}")
        return time.monotonic()

    # ---------------------------------------------------------------- NAT
    def test_agent_behind_nat_deploys_and_has_no_inbound_path(self):
        ctl, rtr, agt = nat_topology(self.net)
        env = self.make_env(ctl, "10.200.1.1", "10.200.1.1")
        a = env.add_agent("natted")
        start_agent_in(self.net, agt, a)
        a.wait_connected()
        # The controller sees the router's address, never the agent's own.
        env.controller.wait_log(r"10\.200\.1\.2:\d+: machine natted connected")
        self.assertNotIn("10.200.2.2", env.controller.text())
        top = env.build("natted-a")
        gen = env.publish("natted", top, "--vars", self.vars_dir("v", "behind-nat\n"))
        s = env.wait_phase("natted", gen, "succeeded")
        self.assertIn("confirmed", s["detail"])
        self.assertEqual(a.current_system(), top)
        with open(os.path.join(a.vars, "key.txt")) as f:
            self.assertEqual(f.read(), "behind-nat\n")

        # Nothing inbound: a listener on the agent's address is reachable from
        # the agent's own namespace, but not from the controller side, which
        # even has a route to the agent's subnet.
        srv = self.net.socket(agt)
        self.addCleanup(srv.close)
        srv.bind(("10.200.2.2", 9999))
        srv.listen(4)
        self.assertTrue(self.net.can_connect(agt, "10.200.2.2", 9999))
        self.assertFalse(self.net.can_connect(ctl, "10.200.2.2", 9999, timeout=1.5),
                         "the controller side reached the agent behind NAT directly")

    def test_machine_behind_nat_fetches_its_closure_through_its_one_connection(self):
        # The closure exists only on the operator's machine and then only in
        # the controller's cache; the machine behind masquerade has no
        # substituter but the controller, reached over its outbound connection.
        ctl, rtr, agt = nat_topology(self.net)
        env = self.make_env(ctl, "10.200.1.1", "10.200.1.1")
        a = env.add_agent("natted-cache")
        start_agent_in(self.net, agt, a)
        a.wait_connected()
        key = os.path.join(env.cli_dir, "cache.key")
        env.cli("key", "generate", "--cache", "--name", "nat-test-1", "--out", key)
        top = env.build("natted-closure", push=False, delete=False, payload=4 << 20)
        closure = subprocess.run(["nix-store", "-q", "--requisites", top], capture_output=True,
                                 text=True, env=nix_env(), check=True).stdout.split()
        self.assertEqual(len(closure), 3, closure)
        argv = [binary("muster"), "--config", os.path.join(env.cli_dir, "config.json")]
        subprocess.run(self.net.exec_argv(ctl, argv + ["cache", "push", top, "--cache-key", key]),
                       check=True, capture_output=True, env=env.cli_env(), timeout=300)
        env.delete_local(top)
        for p in closure:
            self.assertFalse(os.path.exists(p), p)
        r = subprocess.run(self.net.exec_argv(ctl, argv + ["publish", "natted-cache", top,
                                                           "--cache-key", key]),
                           capture_output=True, text=True, env=env.cli_env(), timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        gen = int(r.stdout.split("generation ")[1].split(":")[0])
        s = env.wait_phase("natted-cache", gen, ["succeeded", "failed"], timeout=180)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(a.current_system(), top)
        for p in closure:
            self.assertTrue(os.path.exists(p), p)
        # Fetched through the loopback substituter, i.e. over the agent's one
        # connection (which the controller sees from the router's address).
        out = env.cli("logs", "natted-cache", "--generation", str(gen), "--json").stdout
        text = "\n".join(json.loads(l)["line"] for l in out.splitlines() if l.strip())
        self.assertIn("copying path '" + [p for p in closure if "payload" in p][0], text)
        self.assertIn("http://127.0.0.1:", text)
        self.assertRegex(env.controller.text(), r"10\.200\.1\.2:\d+: machine natted-cache connected")
        self.assertNotIn("10.200.2.2", env.controller.text())

    def test_a_closure_of_many_paths_over_a_slow_link_is_fetched_on_one_connection(self):
        # Behind a link of 2 MB/s, what the agent has asked for and not yet
        # received must stay under what the controller queues for one
        # connection, or the controller would take the agent for a peer that
        # stopped reading and cut it, again and again. (Debian's nix 2.8
        # substitutes one path at a time; nix 2.13 and later up to 16 at once,
        # which agent/substituter_test.cc covers.)
        ctl, rtr, agt = nat_topology(self.net)
        self.net.run(rtr, "tc", "qdisc", "add", "dev", "lan", "root", "tbf", "rate", "16mbit",
                     "burst", "32kb", "latency", "200ms")
        # Small socket buffers, as on a host with many connections: what is
        # on its way waits in the controller's queue, not in the kernel's.
        for ns in (ctl, agt):
            self.net.sysctl(ns, "net.ipv4.tcp_wmem", "4096 65536 262144")
            self.net.sysctl(ns, "net.ipv4.tcp_rmem", "4096 65536 262144")
        env = self.make_env(ctl, "10.200.1.1", "10.200.1.1")
        a = env.add_agent("slow-link")
        start_agent_in(self.net, agt, a)
        a.wait_connected()
        key = os.path.join(env.cli_dir, "cache.key")
        env.cli("key", "generate", "--cache", "--name", "slow-test-1", "--out", key)
        top = env.build("slow-closure", push=False, delete=False, payload=(3 << 20) // 2,
                        payloads=16)
        closure = subprocess.run(["nix-store", "-q", "--requisites", top], capture_output=True,
                                 text=True, env=nix_env(), check=True).stdout.split()
        self.assertEqual(len([p for p in closure if "payload" in p]), 16, closure)
        argv = [binary("muster"), "--config", os.path.join(env.cli_dir, "config.json")]
        subprocess.run(self.net.exec_argv(ctl, argv + ["cache", "push", top, "--cache-key", key]),
                       check=True, capture_output=True, env=env.cli_env(), timeout=300)
        env.delete_local(top)
        r = subprocess.run(self.net.exec_argv(ctl, argv + ["publish", "slow-link", top,
                                                           "--cache-key", key]),
                           capture_output=True, text=True, env=env.cli_env(), timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        gen = int(r.stdout.split("generation ")[1].split(":")[0])
        t = time.monotonic()
        s = env.wait_phase("slow-link", gen, ["succeeded", "failed"], timeout=240)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        note(f"24 MiB in 16 paths over 2 MB/s in {time.monotonic() - t:.1f} s")
        for p in closure:
            self.assertTrue(os.path.exists(p), p)
        text = env.controller.text()
        self.assertNotIn("peer is not reading", text)
        self.assertEqual(len(re.findall(r"machine slow-link connected", text)), 1,
                         "the agent kept its one connection")

    # ------------------------------------------------------------ overlay
    def test_ipv6_ula_overlay_with_controller_on_any_address(self):
        # ZeroTier-like overlay: members addressed by fd00::/8 ULAs (rfc4193
        # mode), two subnets joined by a router; no IPv4 anywhere.
        ctl, rtr, agt = self.net.ns("ctl"), self.net.ns("rtr"), self.net.ns("agt")
        self.net.link(ctl, "zt0", rtr, "zta")
        self.net.link(agt, "zt0", rtr, "ztb")
        c_addr, a_addr = "fd80:56c2:e21c:1:199:93c0:ffee:1", "fd80:56c2:e21c:2:199:93a9:4e11:2"
        self.net.addr(ctl, "zt0", c_addr + "/64")
        self.net.addr(rtr, "zta", "fd80:56c2:e21c:1::fe/64")
        self.net.addr(rtr, "ztb", "fd80:56c2:e21c:2::fe/64")
        self.net.addr(agt, "zt0", a_addr + "/64")
        self.net.route(ctl, "fd80:56c2:e21c:2::/64", "via", "fd80:56c2:e21c:1::fe")
        self.net.route(agt, "default", "via", "fd80:56c2:e21c:2::fe")
        self.net.sysctl(rtr, "net.ipv6.conf.all.forwarding", 1)
        env = self.make_env(ctl, "[::]", c_addr)
        env.controller.wait_log(r"listening on \[::\]:7443")
        a = env.add_agent("overlay")
        self.assertEqual(a.cfg["controllers"], [f"wss://[{c_addr}]:{PORT}"])
        start_agent_in(self.net, agt, a)
        a.wait_connected()
        env.controller.wait_log(rf"\[?{re.escape(a_addr)}\]?:\d+: machine overlay connected")
        top = env.build("overlay-a")
        gen = env.publish("overlay", top, "--vars", self.vars_dir("v", "over-ula\n"))
        s = env.wait_phase("overlay", gen, "succeeded")
        self.assertIn("confirmed", s["detail"])
        self.assertEqual(a.current_system(), top)
        self.assertEqual(os.path.realpath(a.profile), top)
        with open(os.path.join(a.vars, "key.txt")) as f:
            self.assertEqual(f.read(), "over-ula\n")

    # -------------------------------------------------------- silent drop
    def test_silent_drop_is_noticed_by_both_sides_and_the_agent_reconnects(self):
        ctl, rtr, agt = nat_topology(self.net, masquerade=False)
        env = self.make_env(ctl, "10.200.1.1", "10.200.1.1",
                            ["--ping-interval", "1", "--idle-timeout", "3"])
        a = env.add_agent("dropped", pingInterval=1, idleTimeout=3, backoffBase=0.2, backoffCap=1)
        start_agent_in(self.net, agt, a)
        a.wait_connected()
        top = env.build("dropped-a")  # built before the cut: keep the measurement tight
        a_mark, c_mark = len(a.proc.text()), len(env.controller.text())

        # Blackhole the router in both directions: no RST, no ICMP, nothing.
        self.net.iptables(rtr, "-I", "FORWARD", "1", "-j", "DROP")
        t0 = time.monotonic()
        t_agent = self.wait_log_after(a.proc, r"nothing received from the controller for 3 s", a_mark, 15)
        t_ctl = self.wait_log_after(env.controller, r"\(dropped\): nothing received for 3 s; closing",
                                    c_mark, 15)
        wait_until(lambda: not env.status("dropped")["online"], 10, what="dropped shown offline")
        agent_s, ctl_s = t_agent - t0, t_ctl - t0
        note(f"blackhole noticed by agent after {agent_s:.1f} s, controller reaped after {ctl_s:.1f} s")
        # Within the idle timeout (plus at most one ping interval and scheduling
        # slack), and not through some error: only the timeout can see silence.
        self.assertLess(agent_s, 3 + 1 + 1.5)
        self.assertLess(ctl_s, 3 + 1 + 1.5)
        self.assertGreater(agent_s, 1.9)
        self.assertGreater(ctl_s, 1.9)
        self.assertTrue(a.proc.alive())

        # A publish while the path is down waits; when it returns the agent reconnects.
        gen = env.publish("dropped", top)
        time.sleep(1.5)  # a few reconnect attempts into the void
        self.assertNotIn(f"accepted generation {gen}", a.proc.text(), "delivered through a blackhole?")
        self.net.iptables(rtr, "-D", "FORWARD", "-j", "DROP")
        t1 = time.monotonic()
        a.wait_connected(timeout=20)
        reconnect = time.monotonic() - t1
        note(f"reconnected {reconnect:.1f} s after the path returned")
        self.assertLess(reconnect, 12, "the agent's connect timeout is 10 s")
        env.wait_phase("dropped", gen, "succeeded")
        self.assertEqual(a.current_system(), top)

    # ----------------------------------------------------------- idle NAT
    def test_keepalive_pings_keep_a_forgetful_nat_mapping_alive(self):
        ctl, rtr, agt = nat_topology(self.net)
        conntrack_timeout = 5
        # A NAT that forgets an idle connection after 5 s and, like most home
        # routers, does not pick a forgotten connection up again mid-stream.
        self.net.sysctl(rtr, "net.netfilter.nf_conntrack_tcp_timeout_established", conntrack_timeout)
        self.net.sysctl(rtr, "net.netfilter.nf_conntrack_tcp_loose", 0)
        env = self.make_env(ctl, "10.200.1.1", "10.200.1.1")  # controller pings every 30 s
        chatty = env.add_agent("chatty", pingInterval=1, idleTimeout=3)
        # The control: pings far apart, so its mapping expires while idle.
        sleepy = env.add_agent("sleepy", pingInterval=20, idleTimeout=60)
        for a in (chatty, sleepy):
            start_agent_in(self.net, agt, a)
            a.wait_connected()
        top = env.build("idle-a")
        marks = {a.name: len(a.proc.text()) for a in (chatty, sleepy)}
        idle = 3 * conntrack_timeout
        time.sleep(idle)
        self.assertNotRegex(chatty.proc.text()[marks["chatty"]:], r"connection lost|retrying",
                            "chatty reconnected during the idle period")
        self.assertEqual(chatty.proc.text().count("connected to the controller as chatty"), 1)
        self.assertEqual(env.controller.text().count("machine chatty connected"), 1)

        gen = env.publish("chatty", top)
        t0 = time.monotonic()
        chatty.proc.wait_log(rf"accepted generation {gen}", timeout=2)
        note(f"publish after {idle} s idle reached chatty in {time.monotonic() - t0:.2f} s")
        env.wait_phase("chatty", gen, "succeeded")

        # The same publish to the agent without frequent pings does not arrive:
        # the NAT forgot its connection.
        gen2 = env.publish("sleepy", top)
        time.sleep(2)
        self.assertNotIn(f"accepted generation {gen2}", sleepy.proc.text(),
                         "the control connection survived; the NAT did not expire it")
        # The controller's push met the router's reset: the mapping was gone.
        env.controller.wait_log(r"machine sleepy disconnected", timeout=2)


if __name__ == "__main__":
    unittest.main()
