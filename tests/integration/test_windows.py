"""Maintenance windows: `publish --stage` realises at once and activates in the
machine's next window (phase `staged` meanwhile); a rollout respects windows
and waits for machines outside theirs; `--now` overrides. The windows used
here open a few seconds after the test starts (UTC, daily), so nothing waits
longer than the window needs."""
import json
import re
import subprocess
import time

from harness import EnvTest, nix_env


def hhmmss(t):
    return time.strftime("%H:%M:%S", time.gmtime(t))


def window(start, length):
    return [{"days": ["daily"], "start": hhmmss(start), "end": hhmmss(start + length)}]


def valid(path):
    return subprocess.run(["nix-store", "--check-validity", path], capture_output=True,
                          env=nix_env()).returncode == 0


class WindowsTest(EnvTest):
    def rollout(self, rid):
        return json.loads(self.env.cli("rollout", "status", rid, "--json").stdout)

    def test_stage_realises_now_and_activates_when_the_window_opens(self):
        env = self.env.start()
        top = env.build("staged")
        opens = int(time.time()) + 15
        a = env.add_agent("m1", maintenanceTimeZone="UTC",
                          maintenanceWindows=window(opens, 3600)).start()
        a.wait_connected()
        r = env.cli("publish", "m1", top, "--stage", "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public, "--wait", "--timeout", "60")
        self.assertIn("staged: activates in its next maintenance window", r.stdout)
        gen = int(re.search(r"generation (\d+)", r.stdout).group(1))
        # --wait returned at "staged": realised, nothing activated yet.
        s = env.status("m1")
        self.assertEqual((s["generation"], s["phase"]), (gen, "staged"), s)
        self.assertIn("activates in the next maintenance window at", s["detail"])
        self.assertIn("daily %s-%s (UTC)" % (hhmmss(opens), hhmmss(opens + 3600)), s["detail"])
        self.assertTrue(valid(top), "staged means the closure is already fetched")
        self.assertIsNone(a.current_system())
        self.assertEqual(env.activation_log(), [])
        self.assertLess(time.time(), opens, "staged before the window opened")
        # When the window opens, it activates.
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=60)
        self.assertEqual(s["phase"], "succeeded", s)
        self.assertGreaterEqual(time.time(), opens)
        self.assertEqual(a.current_system(), top)
        events = env.events("m1", gen)
        self.assertLess(events.index("realising"), events.index("staged"))
        self.assertLess(events.index("staged"), events.index("activating"))
        for e in env.history("m1")[0]["events"]:
            if e["phase"] == "activating":
                self.assertGreaterEqual(e["at"] // 1000, opens)

    def test_rollout_waits_outside_the_window_and_now_overrides(self):
        env = self.env.start()
        top = env.build("rolled")
        free = env.add_agent("m1", tags=["fleet"]).start()  # no windows: at once
        later = int(time.time()) + 6 * 3600
        m2 = env.add_agent("m2", tags=["fleet"], maintenanceTimeZone="UTC",
                           maintenanceWindows=window(later, 3600)).start()
        for a in (free, m2):
            a.wait_connected()
        r = env.cli("publish", "--tag", "fleet", top, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
        items = {i["machine"]: i for i in self.rollout(rid)["items"]}
        gen2 = items["m2"]["generation"]
        env.wait_phase("m1", items["m1"]["generation"], "succeeded")
        env.wait_phase("m2", gen2, "staged")
        self.assertTrue(valid(top))
        self.assertIsNone(m2.current_system())
        ro = self.rollout(rid)
        self.assertEqual(ro["state"], "running", "the rollout waits; it does not fail")
        states = {i["machine"]: i["state"] for i in ro["items"]}
        self.assertEqual(states["m1"], "succeeded")
        self.assertNotIn(states["m2"], ("failed", "succeeded"))

        # A restarted agent is still staged (persisted), still waiting.
        m2.stop()
        m2.start()
        m2.proc.wait_log(r"resuming generation %d from phase staged" % gen2)
        m2.wait_connected()
        s = env.wait_phase("m2", gen2, "staged")
        self.assertIn("activates in the next maintenance window", s["detail"])
        self.assertIsNone(m2.current_system())
        self.assertEqual(self.rollout(rid)["state"], "running")

        # --now: activate at once, outside the window.
        r = env.cli("publish", "m2", top, "--now", "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public, "--wait", "--timeout", "120")
        gen3 = int(re.search(r"generation (\d+)", r.stdout).group(1))
        self.assertEqual(env.status("m2")["phase"], "succeeded")
        self.assertEqual(m2.current_system(), top)
        self.assertGreater(gen3, gen2)
        staged = [g for g in env.history("m2") if g["generation"] == gen2][0]["events"]
        self.assertEqual(staged[-1]["phase"], "failed", staged)
        self.assertIn("superseded by generation %d while staged" % gen3, staged[-1]["detail"])
        self.assertIn("nothing was changed", staged[-1]["detail"])
        ro = self.rollout(rid)
        states = {i["machine"]: i["state"] for i in ro["items"]}
        self.assertEqual(states["m2"], "superseded")

    def test_stage_and_now_exclude_each_other(self):
        env = self.env.start()
        r = env.cli("publish", "m1", "/nix/store/" + "a" * 32 + "-x", "--stage", "--now",
                    check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--stage and --now exclude each other", r.stderr)
