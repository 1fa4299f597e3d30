"""Operators declared in a module's settings (clan instance `operators`,
services.muster-controller.operators) stop being trusted once removed from them.

Controller side: `muster-controller operator sync --file FILE` (what the NixOS
module runs before every start) makes the declared set the managed one; a
running controller refuses a removed operator at once, and an operator added by
hand stays. Agent side: trustedOperatorKeys is rendered from the same settings;
an agent restarted with the new configuration refuses a generation signed by
the removed operator, even when the controller still accepts that operator.
"""
import json
import os
import re
import subprocess
import unittest

from harness import EnvTest, binary, wait_until


class DeclaredOperatorsTest(EnvTest):
    def key(self, name):
        path = os.path.join(self.env.cli_dir, f"{name}.key")
        pub = subprocess.run([binary("muster"), "--key", path, "key", "generate"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return path, pub

    def sync(self, operators, check=True):
        path = os.path.join(self.env.root, "operators.json")
        with open(path, "w") as f:
            json.dump(operators, f)
        r = subprocess.run([binary("muster-controller"), "operator", "sync", "--file", path,
                            "--state-dir", self.env.ctl_dir], capture_output=True, text=True)
        if check:
            self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def admitted(self, key):
        return self.env.cli("status", key=key, check=False).returncode == 0

    def test_removed_from_the_settings_is_refused_by_the_controller(self):
        env = self.env.start()  # alice added by hand (muster-controller operator add)
        bob_key, bob_pub = self.key("bob")
        carol_key, carol_pub = self.key("carol")
        r = self.sync({"bob": bob_pub, "carol": carol_pub})
        self.assertIn("added bob, carol", r.stdout)
        self.assertIn("kept (added by hand) alice", r.stdout)
        wait_until(lambda: self.admitted(bob_key) and self.admitted(carol_key), 10,
                   what="bob and carol admitted")
        # The same declaration again (the next start): nothing changes.
        r = self.sync({"bob": bob_pub, "carol": carol_pub})
        self.assertIn("added none; new key none; removed none", r.stdout)

        # carol is removed from the settings: the running controller refuses her.
        r = self.sync({"bob": bob_pub})
        self.assertIn("removed carol", r.stdout)
        wait_until(lambda: not self.admitted(carol_key), 10, what="carol refused")
        r = env.cli("status", key=carol_key, check=False)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn("refused", r.stderr)
        self.assertTrue(self.admitted(bob_key))
        ops = sorted(o["name"] for o in json.loads(env.cli("operator", "list", "--json").stdout))
        self.assertEqual(ops, ["alice", "bob"])

        # A new key for bob: the old one is refused, the new one admitted.
        bob2_key, bob2_pub = self.key("bob2")
        r = self.sync({"bob": bob2_pub})
        self.assertIn("new key bob", r.stdout)
        wait_until(lambda: not self.admitted(bob_key) and self.admitted(bob2_key), 10,
                   what="bob's new key in place of the old one")

        # A declaration that is not valid changes nothing and says why.
        r = self.sync({"bob": "ed25519:nope"}, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("operator 'bob'", r.stderr)
        self.assertTrue(self.admitted(bob2_key))
        r = self.sync({"dave": bob2_pub}, check=False)  # bob's key under another name
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("operator 'dave'", r.stderr)
        self.assertTrue(self.admitted(bob2_key))
        self.assertTrue(env.controller.alive())

    def test_agent_restarted_without_the_operator_refuses_its_generations(self):
        env = self.env.start()
        bob_key, bob_pub = self.key("bob")
        # bob stays registered on the controller (by hand): only the agent's
        # configuration changes, as the module renders it from the settings.
        subprocess.run([binary("muster-controller"), "operator", "add", "bob", "--key", bob_pub,
                        "--state-dir", env.ctl_dir], check=True, capture_output=True)
        agent = env.add_agent("web1", trustedOperatorKeys=[env.op_pub, bob_pub]).start()
        agent.wait_connected()
        bob_conf = env.write_cli_config("bob.json", key=bob_key, trustedOperatorKeys=[env.op_pub])
        first = env.build("first")

        def publish_as_bob(top):
            r = env.cli("publish", "web1", top, "--substituter", env.cache.url,
                        "--trusted-public-key", env.cache.public, "--force",
                        key=bob_key, config=bob_conf)
            return int(re.search(r"generation (\d+)", r.stdout).group(1))

        gen = publish_as_bob(first)
        env.wait_phase("web1", gen, "succeeded")
        self.assertEqual(agent.current_system(), first)

        # bob is removed from the settings: the agent's new configuration
        # (a new store path, so the unit restarts) trusts alice only.
        agent.stop()
        agent.cfg["trustedOperatorKeys"] = [env.op_pub]
        agent.write_config()
        agent.start()
        agent.wait_connected()
        second = env.build("second")
        gen = publish_as_bob(second)
        s = env.wait_phase("web1", gen, "refused")
        self.assertIn("is signed by unknown key", s["detail"])
        self.assertIn("add it to trustedOperatorKeys", s["detail"])
        self.assertEqual(agent.current_system(), first)
        # alice, still in the settings, deploys as before.
        gen = env.publish("web1", second, "--force")
        env.wait_phase("web1", gen, "succeeded")
        self.assertEqual(agent.current_system(), second)


if __name__ == "__main__":
    unittest.main()
