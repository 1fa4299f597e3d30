"""End-to-end deploys through the real controller, agent and CLI."""
import json
import os
import stat
import unittest

from harness import EnvTest, wait_until


class DeployTest(EnvTest):
    def test_switch_realises_installs_vars_activates_and_confirms(self):
        env = self.env.start()
        a = env.add_agent("web1", tags=["web"]).start()
        a.wait_connected()
        top = env.build("web1-a")
        self.assertFalse(os.path.exists(top), "toplevel must come from the cache")
        vars_dir = os.path.join(env.root, "vars-in")
        os.makedirs(os.path.join(vars_dir, "activation", "web1"))
        with open(os.path.join(vars_dir, "key.txt"), "w") as f:
            f.write("AGE-SECRET-KEY-1TEST\n")
        with open(os.path.join(vars_dir, "activation", "web1", "token"), "w") as f:
            f.write("s3cret")
        os.chmod(os.path.join(vars_dir, "activation", "web1", "token"), 0o440)
        gen = env.publish("web1", top, "--vars", vars_dir)
        self.assertEqual(gen, 1)
        s = env.wait_phase("web1", 1, "succeeded")
        self.assertTrue(os.path.exists(top), "realised from the binary cache")
        self.assertEqual(os.path.realpath(a.profile), top)
        self.assertEqual(a.current_system(), top)
        self.assertEqual(env.activation_log(), ["web1-a switch nixos"])
        with open(os.path.join(a.vars, "key.txt")) as f:
            self.assertEqual(f.read(), "AGE-SECRET-KEY-1TEST\n")
        tok = os.path.join(a.vars, "activation", "web1", "token")
        with open(tok) as f:
            self.assertEqual(f.read(), "s3cret")
        self.assertEqual(stat.S_IMODE(os.stat(tok).st_mode), 0o440)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(a.vars, "activation")).st_mode), 0o700)
        self.assertEqual(os.stat(tok).st_uid, 0)
        self.assertIn("confirmed", s["detail"])
        phases = env.events("web1", 1)
        for p in ["verified", "realising", "vars-installed", "profile-set", "activating",
                  "confirming", "succeeded"]:
            self.assertIn(p, phases)
        self.assertLess(phases.index("realising"), phases.index("activating"))
        self.assertLess(phases.index("activating"), phases.index("succeeded"))

    def test_previous_vars_are_removed_once_the_deploy_is_confirmed(self):
        env = self.env.start()
        a = env.add_agent("web1").start()
        a.wait_connected()
        vars_dir = os.path.join(env.root, "vars-in")
        os.makedirs(vars_dir)
        key = os.path.join(vars_dir, "key.txt")
        previous = a.vars + ".muster-previous"
        for n, secret in enumerate(["AGE-SECRET-KEY-OLD\n", "AGE-SECRET-KEY-NEW\n"], 1):
            with open(key, "w") as f:
                f.write(secret)
            gen = env.publish("web1", env.build(f"web1-v{n}"), "--vars", vars_dir)
            env.wait_phase("web1", gen, "succeeded")
            self.assertFalse(os.path.exists(previous),
                             f"generation {gen}: the replaced vars do not linger after success")
            with open(os.path.join(a.vars, "key.txt")) as f:
                self.assertEqual(f.read(), secret)
        # A copy left by an agent that stopped before removing it goes at start.
        a.stop()
        os.makedirs(previous)
        with open(os.path.join(previous, "key.txt"), "w") as f:
            f.write("AGE-SECRET-KEY-OLD\n")
        a.start()
        a.wait_connected()
        self.assertFalse(os.path.exists(previous))
        self.assertEqual(env.status("web1")["phase"], "succeeded")


if __name__ == "__main__":
    unittest.main()
