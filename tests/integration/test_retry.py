"""`muster rollout retry ID`: the failed and rolled-back machines of a rollout
again, as a new rollout of newly signed generations with the same closure."""
import json
import os
import re

from harness import EnvTest


class RolloutRetryTest(EnvTest):
    def rollout(self, rid):
        return json.loads(self.env.cli("rollout", "status", rid, "--json").stdout)

    def test_retry_republishes_only_the_failed_machines(self):
        env = self.env.start()
        flag = os.path.join(env.root, "healthy")
        check = [{"name": "flag", "command": ["/usr/bin/test", "-e", flag], "timeout": 2}]
        good = env.add_agent("ok1", tags=["fleet"]).start()
        bad = [env.add_agent(n, tags=["fleet"], confirmTimeout=3, healthChecks=check).start()
               for n in ("bad2", "bad3")]
        for a in [good] + bad:
            a.wait_connected()
        top = env.build("retry-me")
        r = env.cli("publish", "--tag", "fleet", top, "--max-failures", "5", "--substituter",
                    env.cache.url, "--trusted-public-key", env.cache.public, "--wait", "--timeout",
                    "120", check=False)
        rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
        items = {i["machine"]: i for i in self.rollout(rid)["items"]}
        self.assertEqual(items["ok1"]["state"], "succeeded")
        for a in bad:
            self.assertEqual(items[a.name]["state"], "failed")
            self.assertIn(env.status(a.name)["phase"], ("failed", "rolled-back"))

        # Still refused while the original runs? It finished; retry it once fixed.
        with open(flag, "w") as f:
            f.write("ok\n")
        r = env.cli("rollout", "retry", rid, "--wait", "--timeout", "120", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        new = re.search(r"rollout (r[0-9a-f]+): retrying 2 machines of rollout " + rid, r.stdout)
        self.assertIsNotNone(new, r.stdout)
        nid = new.group(1)
        self.assertNotEqual(nid, rid)
        again = {i["machine"]: i for i in self.rollout(nid)["items"]}
        self.assertEqual(sorted(again), ["bad2", "bad3"], "only the failed machines")
        for a in bad:
            self.assertEqual(again[a.name]["state"], "succeeded")
            self.assertEqual(again[a.name]["generation"], items[a.name]["generation"] + 1,
                             "a new, higher generation")
            s = env.status(a.name)
            self.assertEqual(s["phase"], "succeeded")
            self.assertEqual(a.current_system(), top, "the same closure")
        self.assertEqual(env.status("ok1")["generation"], items["ok1"]["generation"],
                         "the succeeded machine is not touched")
        self.assertEqual(self.rollout(nid)["state"], "succeeded")

        r = env.cli("rollout", "retry", nid, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("has no failed or rolled-back machines to retry", r.stderr)
        r = env.cli("rollout", "retry", "r00000000", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no rollout 'r00000000'", r.stderr)

    def test_retry_waits_for_a_running_rollout_to_stop(self):
        env = self.env.start()
        env.add_agent("off1", tags=["fleet"])  # registered, never connects: stays pending
        a = env.add_agent("fail1", tags=["fleet"]).start()
        a.wait_connected()
        r = env.cli("publish", "--tag", "fleet", env.build("retry-fail", behaviour="fail"),
                    "--max-failures", "5", "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
        env.wait_phase("fail1", 1, ("failed", "rolled-back"))
        r = env.cli("rollout", "retry", rid, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("is still running; abort it first", r.stderr)
        env.cli("rollout", "abort", rid)
        r = env.cli("rollout", "retry", rid)
        self.assertIn("retrying 1 machine of rollout " + rid + ": fail1", r.stdout)
