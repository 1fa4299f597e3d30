"""muster under a real systemd (label "systemd"): the .deb installed in a booted
Debian 12 container (container.py), the packaged units, activation through
systemd-run in a transient unit that outlives the agent, reboots.

The controller and the operator CLI run on the host's loopback (the
integration harness); the container shares the host's network. Fake NixOS-like
toplevels come from tests/integration/toplevel.nix through a signed file://
cache that is bind-mounted read-only into the container.

Run one test: python3 test_systemd.py SystemdTest.test_deploy_in_transient_unit
Exit status 77 (ctest: skipped) when nspawn cannot boot a container here.
"""
import glob
import json
import os
import re
import socket
import sys
import time
import unittest
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
sys.path.insert(0, HERE)

import container  # noqa: E402
import harness  # noqa: E402

LOG = "/var/lib/muster-test/activation.log"  # inside the container
AGENT_JSON = "/etc/muster/agent.json"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deb_path():
    d = os.environ.get("MUSTER_DEB_DIR") or os.path.join(harness.BIN, "deb")
    debs = sorted(glob.glob(os.path.join(d, "muster_*.deb")))
    if not debs:
        raise AssertionError(f"no muster_*.deb in {d}: the packaging.deb test builds it "
                             "(ctest runs it first as a fixture; or run ctest -R packaging.deb)")
    return debs[-1]


class SystemdTest(unittest.TestCase):
    def setUp(self):
        try:
            root = container.ensure_root(log=lambda m: sys.stderr.write(m + "\n"))
        except container.CannotBoot as e:
            self.skipTest(f"cannot boot a systemd container here: {e}")
        self.deb = deb_path()
        self.env = harness.Env(self.id().split(".")[-1].replace("test_", "sd-"))
        self.addCleanup(self.env.close)
        self.env.start()
        self.env.ensure_cache()
        self.name = "box"
        work = os.path.join(self.env.root, "container")
        os.makedirs(work)
        try:
            self.c = container.Container(root, work, binds_ro=[
                self.env.cache.dir, f"{os.path.dirname(self.deb)}:/mnt/muster-deb"])
            self.addCleanup(self._close_container)
            took = self.c.boot()
        except container.CannotBoot as e:
            self.skipTest(f"cannot boot a systemd container here: {e}")
        sys.stderr.write(f"container booted in {took:.2f} s\n")

    def _close_container(self):
        if self._outcome_failed():
            for unit in ("muster-agent", "muster-controller"):
                r = self.c.run(["journalctl", "-u", unit, "--no-pager", "-n", "80"], check=False)
                sys.stderr.write(f"\n===== journal of {unit} =====\n{r.stdout[-6000:]}\n")
            sys.stderr.write(f"\n===== nspawn =====\n{self.c.log_tail(2000)}\n")
        self.c.close()

    def _outcome_failed(self):
        res = getattr(self, "_outcome", None)
        errors = getattr(res, "errors", None) or getattr(getattr(res, "result", None), "errors", [])
        return bool(errors) or bool(getattr(getattr(res, "result", None), "failures", []))

    # ------------------------------------------------------------- helpers
    def install_deb(self):
        base = os.path.basename(self.deb)
        self.c.run(["dpkg", "-i", f"/mnt/muster-deb/{base}"])

    def start_agent(self, **settings):
        self.install_deb()
        cfg = {
            "machine": self.name,
            "controllers": [self.env.url()],
            "controllerPin": self.env.pin,
            "trustedOperatorKeys": [self.env.op_pub],
            "confirmTimeout": 60,
            "backoffBase": 0.2,
            "backoffCap": 1,
            "logLevel": "debug",
            **settings,
        }
        self.c.write(AGENT_JSON, json.dumps(cfg, indent=1), 0o600)
        self.c.run(["mkdir", "-p", os.path.dirname(LOG)])
        key = self.c.run(["muster-agent", "--config", AGENT_JSON, "--print-key"]).stdout.strip()
        self.env.cli("machine", "add", self.name, "--key", key)
        self.c.run(["systemctl", "enable", "--now", "muster-agent.service"])
        self.wait_online()

    def wait_online(self, timeout=30):
        harness.wait_until(lambda: self.env.status(self.name)["online"], timeout,
                           interval=0.2, what=f"{self.name} online")

    def build(self, name, **kw):
        return self.env.build(name, log=LOG, **kw)

    def deploy(self, path, phases="succeeded", timeout=90):
        gen = self.env.publish(self.name, path)
        return gen, self.env.wait_phase(self.name, gen, phases, timeout)

    def details(self, gen):
        for g in self.env.history(self.name):
            if g["generation"] == gen:
                return [f"{e['phase']}: {e['detail']}" for e in g["events"]]
        return []

    def wait_activation_started(self, name, timeout=60):
        harness.wait_until(lambda: re.search(rf"^{name} ", self.c.read(LOG) or "", re.M),
                           timeout, interval=0.1, what=f"activation of {name} started")

    def unit_state(self, unit):
        return self.c.run(["systemctl", "show", "--property=ActiveState", "--value", unit],
                          check=False).stdout.strip()

    def main_pid(self, unit="muster-agent.service"):
        return int(self.c.run(["systemctl", "show", "--property=MainPID", "--value",
                               unit]).stdout.strip())

    def current_system(self):
        return self.c.run(["readlink", "-e", "/run/current-system"], check=False).stdout.strip()

    # --------------------------------------------------------------- tests
    def test_deploy_in_transient_unit(self):
        """The packaged unit from the .deb deploys a NixOS-like generation through
        systemd-run --pipe --wait --collect: it runs in its own transient unit."""
        self.start_agent()
        frag = self.c.run(["systemctl", "show", "--property=FragmentPath", "--value",
                           "muster-agent.service"]).stdout.strip()
        self.assertEqual(frag, "/lib/systemd/system/muster-agent.service")
        path = self.build("sd-one")
        gen, st = self.deploy(path)
        self.assertEqual(st["toplevel"], path)
        self.assertEqual(self.current_system(), path)
        cgroup = self.c.read(LOG + ".sd-one.cgroup") or ""
        self.assertIn(f"0::/system.slice/muster-activate-gen{gen}-activate.service", cgroup)
        # --collect: the transient unit is gone once it finished.
        self.assertEqual(self.unit_state(f"muster-activate-gen{gen}-activate.service"), "inactive")
        # Its output still reached the operator through --pipe (log lines are
        # stored by the controller's log writer, after the final report).
        want = "activating sd-one (nixos) action switch"
        deadline = time.monotonic() + 20
        logs = ""
        while time.monotonic() < deadline and want not in logs:
            logs = self.env.cli("logs", self.name, "--generation", str(gen), check=False).stdout
            if want not in logs:
                time.sleep(0.2)
        self.assertIn(want, logs)

    def test_restart_and_kill_during_activation(self):
        """systemctl restart (and kill -9 of the main PID) while a long activation
        runs: the agent stops at once, the activation finishes in its transient
        unit and the next agent reports its result; a failed one rolls back."""
        self.start_agent()
        # 1. systemctl restart 2 s into an 8 s activation.
        slow = self.build("sd-slow", sleep=8)
        gen = self.env.publish(self.name, slow)
        unit = f"muster-activate-gen{gen}-activate.service"
        self.wait_activation_started("sd-slow")
        t0 = time.monotonic()
        self.c.run(["systemctl", "restart", "muster-agent.service"])
        took = time.monotonic() - t0
        sys.stderr.write(f"systemctl restart muster-agent during activation: {took:.2f} s\n")
        self.assertLess(took, 4.0, "the agent must stop at once on SIGTERM, not wait for "
                        "the activation")
        self.assertEqual(self.unit_state(unit), "active", "the activation outlives the agent")
        st = self.env.wait_phase(self.name, gen, "succeeded", 60)
        self.assertEqual(st["toplevel"], slow)
        self.assertIn("confirming: activation finished while the agent was down",
                      "\n".join(self.details(gen)))
        self.assertEqual(self.current_system(), slow)

        # 2. kill -9 of the agent's main PID (Restart=always starts a new one).
        slow2 = self.build("sd-slow2", sleep=6)
        gen2 = self.env.publish(self.name, slow2)
        self.wait_activation_started("sd-slow2")
        pid = self.main_pid()
        self.c.run(["/bin/sh", "-c", f"kill -9 {pid}"])
        self.assertEqual(self.unit_state(f"muster-activate-gen{gen2}-activate.service"), "active")
        st = self.env.wait_phase(self.name, gen2, "succeeded", 60)
        self.assertNotEqual(self.main_pid(), pid)
        self.assertEqual(st["toplevel"], slow2)
        self.assertEqual(self.current_system(), slow2)

        # 3. A failed activation with a restart in the middle still rolls back.
        bad = self.build("sd-bad", behaviour="fail", sleep=5)
        gen3 = self.env.publish(self.name, bad)
        self.wait_activation_started("sd-bad")
        self.c.run(["systemctl", "restart", "muster-agent.service"])
        st = self.env.wait_phase(self.name, gen3, ("rolled-back", "failed"), 60)
        self.assertEqual(st["phase"], "rolled-back", st)
        self.assertIn("activation failed while the agent was down", st["detail"])
        self.assertEqual(self.current_system(), slow2)
        log = self.c.read(LOG) or ""
        self.assertIn("sd-slow2 switch nixos", log.splitlines()[-1], "re-activated the previous")

    def test_activation_restarts_the_agent(self):
        """The activation restarts muster-agent.service (a NixOS switch that
        changed muster's unit or package): no stop/wait cycle, the deploy
        completes and confirms."""
        self.start_agent()
        path = self.build("sd-self", behaviour="restart-agent")
        t0 = time.monotonic()
        gen, st = self.deploy(path, timeout=80)
        took = time.monotonic() - t0
        sys.stderr.write(f"deploy whose activation restarts muster-agent: {took:.2f} s\n")
        self.assertLess(took, 30.0, "the restart must not wait for TimeoutStopSec (90 s)")
        self.assertEqual(st["toplevel"], path)
        events = "\n".join(self.details(gen))
        self.assertIn("activation finished while the agent was down", events)
        self.assertIn("confirmed", st["detail"])
        out = self.c.run(["journalctl", "-u", "muster-agent.service", "--no-pager", "-o", "cat"],
                         check=False).stdout
        self.assertIn(f"muster-activate-gen{gen}-activate.service goes on without it", out)
        self.assertEqual(self.c.read(LOG).splitlines()[-1], "sd-self switch nixos")

    def test_reboot_when_required(self):
        """rebootPolicy when-required: a generation with another kernel reboots
        the container; after boot the agent reports it booted into it."""
        self.start_agent(rebootPolicy="when-required")
        first = self.build("sd-k1", kernel="6.1.0")
        self.deploy(first)
        # Boot into it, so that /run/booted-system is that generation.
        self.c.run(["systemctl", "reboot"], check=False)
        self.assertEqual(self.c.wait_exit(60), 133)
        self.c.boot()
        self.wait_online()
        boot_before = self.c.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
        second = self.build("sd-k2", kernel="6.2.0")
        gen = self.env.publish(self.name, second)
        rc = self.c.wait_exit(90)
        self.assertEqual(rc, 133, "the agent should have rebooted the container")
        self.c.boot()
        boot_after = self.c.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
        self.assertNotEqual(boot_before, boot_after)
        self.assertEqual(self.c.run(["readlink", "-e", "/run/booted-system"]).stdout.strip(), second)

        def booted():
            s = self.env.status(self.name)
            return s if s["generation"] == gen and "booted into" in s["detail"] else None
        st = harness.wait_until(booted, 60, interval=0.2, what="report after the reboot")
        self.assertEqual(st["phase"], "succeeded")
        self.assertFalse(st["rebootRequired"])
        self.assertIn(f"boot {boot_after}", st["detail"])
        self.assertIn("reboot required", "\n".join(self.details(gen)))

    def test_controller_unit_hardened_and_serving(self):
        """The packaged controller unit starts with its hardening and serves an
        operator on the host's loopback."""
        self.install_deb()
        port, mport = free_port(), free_port()
        self.c.write("/etc/muster/controller.json", json.dumps({
            "stateDir": "/var/lib/muster-controller", "listen": [f"127.0.0.1:{port}"],
            "metricsListen": f"127.0.0.1:{mport}", "logLevel": "info"}))
        self.c.run(["systemctl", "enable", "--now", "muster-controller.service"])
        harness.wait_until(lambda: self.unit_state("muster-controller.service") == "active", 30,
                           what="muster-controller active")
        pid = self.main_pid("muster-controller.service")
        status = self.c.run(["cat", f"/proc/{pid}/status"]).stdout
        fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        uid = self.c.run(["id", "-u", "muster"]).stdout.strip()
        self.assertEqual(fields["Uid"].split()[0], uid, "runs as the muster user")
        self.assertEqual(int(fields["CapEff"].strip(), 16), 0, "no capabilities")
        self.assertEqual(fields["NoNewPrivs"].strip(), "1")
        self.assertEqual(fields["Seccomp"].strip(), "2", "SystemCallFilter is in force")
        # It serves metrics on the loopback the host shares ...
        body = harness.wait_until(
            lambda: self._get(f"http://127.0.0.1:{mport}/metrics"), 20, what="metrics")
        self.assertIn("muster_", body)
        # ... and an operator over TLS (pin from the journal, operator added as muster).
        journal = harness.wait_until(lambda: re.search(r"pin:\s+(sha256:[0-9a-f]{64})", self.c.run(
            ["journalctl", "-u", "muster-controller", "--no-pager", "-o", "cat"]).stdout), 20,
            what="pin in the journal")
        pin = journal.group(1)
        self.c.run(["runuser", "-u", "muster", "--", "muster-controller", "operator", "add", "alice",
                    "--key", self.env.op_pub, "--state-dir", "/var/lib/muster-controller"])
        self.c.run(["systemctl", "restart", "muster-controller.service"])
        cfg = self.env.write_cli_config("box-controller.json",
                                        controller=f"wss://127.0.0.1:{port}", pin=pin)
        r = harness.wait_until(lambda: (lambda r: r if r.returncode == 0 else None)(
            self.env.cli("status", "--json", config=cfg, check=False)), 20,
            what="muster status against the controller in the container")
        self.assertEqual(json.loads(r.stdout), [])

    @staticmethod
    def _get(url):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2)
    r = prog.result
    if r.wasSuccessful() and r.testsRun and len(r.skipped) == r.testsRun:
        sys.exit(77)  # ctest SKIP_RETURN_CODE
    sys.exit(0 if r.wasSuccessful() else 1)
