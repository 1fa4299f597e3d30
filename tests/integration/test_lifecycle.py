"""The deploy lifecycle with real nix: rollback paths, kinds, actions, restarts."""
import os
import pwd
import re
import stat
import time
import unittest

from harness import CuttableProxy, EnvTest, wait_until


class LifecycleTest(EnvTest):
    def deploy_good(self, agent, name="good"):
        top = self.env.build(name)
        gen = self.env.publish(agent.name, top)
        self.env.wait_phase(agent.name, gen, "succeeded")
        return top, gen

    def test_failed_activation_rolls_back_to_the_previous_closure(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        good, _ = self.deploy_good(a)
        vars_dir = os.path.join(env.root, "v")
        os.makedirs(vars_dir)
        with open(os.path.join(vars_dir, "key.txt"), "w") as f:
            f.write("new-key")
        bad = env.build("bad", behaviour="fail")
        gen = env.publish("m1", bad, "--vars", vars_dir)
        s = env.wait_phase("m1", gen, ["rolled-back", "failed"])
        self.assertEqual(s["phase"], "rolled-back", s["detail"])
        self.assertIn("activation failed", s["detail"])
        self.assertIn("fake failure", s["detail"])
        self.assertEqual(env.activation_log(), ["good switch nixos", "bad switch nixos", "good switch nixos"])
        self.assertEqual(a.current_system(), good)
        self.assertEqual(os.path.realpath(a.profile), good)
        # Vars are back to what they were before (nothing: the first deploy had none).
        self.assertFalse(os.path.exists(os.path.join(a.vars, "key.txt")))

    def test_failing_health_check_rolls_back(self):
        env = self.env.start()
        flag = os.path.join(env.root, "healthy")
        a = env.add_agent("m1", confirmTimeout=3,
                          healthChecks=[{"name": "flag", "command": ["/usr/bin/test", "-e", flag],
                                         "timeout": 5}]).start()
        open(flag, "w").close()
        good, _ = self.deploy_good(a)
        os.unlink(flag)
        top = env.build("unhealthy")
        gen = env.publish("m1", top)
        s = env.wait_phase("m1", gen, ["rolled-back", "failed"])
        self.assertEqual(s["phase"], "rolled-back", s["detail"])
        self.assertIn("health checks did not pass", s["detail"])
        self.assertIn("flag", s["detail"])
        self.assertEqual(a.current_system(), good)
        self.assertEqual(env.activation_log()[-2:], ["unhealthy switch nixos", "good switch nixos"])

    def test_lost_connectivity_after_activation_rolls_back(self):
        env = self.env.start()
        proxy = CuttableProxy(env.port, os.path.join(env.root, "cut"))
        self.addCleanup(proxy.close)
        a = env.add_agent("m1", controllers=[f"wss://127.0.0.1:{proxy.port}"], confirmTimeout=4,
                          pingInterval=1, idleTimeout=2.5).start()
        a.wait_connected()
        good, _ = self.deploy_good(a)
        cutter = env.build("cutter", behaviour="cut")
        gen = env.publish("m1", cutter)
        # The agent activates, loses the controller, waits out confirmTimeout and
        # re-activates the good closure, whose activation restores networking.
        s = env.wait_phase("m1", gen, ["rolled-back", "failed"], timeout=60)
        self.assertEqual(s["phase"], "rolled-back", s["detail"])
        self.assertIn("controller could not be reached", s["detail"])
        self.assertEqual(env.activation_log()[-2:], ["cutter switch nixos", "good switch nixos"])
        self.assertEqual(a.current_system(), good)
        self.assertFalse(proxy.cut())

    def test_same_closure_again_is_unchanged_unless_forced(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        good, _ = self.deploy_good(a)
        gen = env.publish("m1", good)
        s = env.wait_phase("m1", gen, "unchanged")
        self.assertIn("already active", s["detail"])
        self.assertEqual(env.activation_log(), ["good switch nixos"])
        gen = env.publish("m1", good, "--force")
        env.wait_phase("m1", gen, "succeeded")
        self.assertEqual(env.activation_log(), ["good switch nixos", "good switch nixos"])

    def test_closure_signed_by_an_untrusted_key_is_refused_by_nix(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        top = env.build("unsigned")
        # Claim a different cache key than the one that signed the cache.
        r = env.cli("publish", "m1", top, "--substituter", env.cache.url, "--trusted-public-key",
                    "other-cache-1:" + "A" * 43 + "=")
        gen = int(re.search(r"generation (\d+)", r.stdout).group(1))
        s = env.wait_phase("m1", gen, "failed")
        self.assertIn("not signed by any of the manifest's trusted public keys", s["detail"])
        self.assertFalse(os.path.exists(top))
        self.assertEqual(env.activation_log(), [])
        self.assertFalse(os.path.lexists(a.profile))

    def test_darwin_home_manager_and_plain_profile_kinds(self):
        env = self.env.start()
        a = env.add_agent("mac").start()
        d = env.build("darwin", kind="darwin")
        gen = env.publish("mac", d)
        env.wait_phase("mac", gen, "succeeded")
        self.assertEqual(env.activation_log(), ["darwin activate darwin"])
        self.assertEqual(os.path.realpath(a.profile), d)
        hm = env.build("hm", kind="home-manager")
        gen = env.publish("mac", hm)
        env.wait_phase("mac", gen, "succeeded")
        self.assertEqual(env.activation_log()[-1], "hm activate home-manager")
        plain = env.build("plain", kind="profile")
        gen = env.publish("mac", plain)
        s = env.wait_phase("mac", gen, "succeeded")
        self.assertEqual(os.path.realpath(a.profile), plain)
        self.assertEqual(len(env.activation_log()), 2, "a plain profile has no activation")
        self.assertIn("confirmed", s["detail"])

    def test_home_manager_activates_as_its_user(self):
        env = self.env.start()
        log = os.path.join(env.root, "hm-user.log")
        a = env.add_agent("laptop", homeManagerUser="nobody").start()
        hm = env.build("hmuser", kind="home-manager", log=log)
        os.chmod(env.root, 0o777)  # the activation writes its log as "nobody"
        gen = env.publish("laptop", hm)
        env.wait_phase("laptop", gen, "succeeded")
        self.assertEqual(os.stat(log).st_uid, pwd.getpwnam("nobody").pw_uid)
        with open(log) as f:
            self.assertEqual(f.read().strip(), "hmuser activate home-manager")

    def test_boot_action_sets_profile_and_reports_reboot_required(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        good, _ = self.deploy_good(a)
        os.symlink(good, a.booted)  # the machine booted into "good" (kernel 6.1.0)
        newer = env.build("newkernel", kernel="6.6.1")
        gen = env.publish("m1", newer, "--action", "boot")
        s = env.wait_phase("m1", gen, "succeeded")
        self.assertTrue(s["rebootRequired"])
        self.assertIn("nothing to confirm", s["detail"])
        self.assertEqual(os.path.realpath(a.profile), newer)
        self.assertEqual(a.current_system(), good, "boot does not switch the running system")
        self.assertEqual(env.activation_log()[-1], "newkernel boot nixos")
        table = env.cli("status").stdout
        self.assertRegex(table, r"m1\s.*succeeded\s+yes")

    def test_test_action_leaves_the_profile_and_dry_activate_changes_nothing(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        good, _ = self.deploy_good(a)
        t = env.build("trial")
        gen = env.publish("m1", t, "--action", "test")
        env.wait_phase("m1", gen, "succeeded")
        self.assertEqual(a.current_system(), t)
        self.assertEqual(os.path.realpath(a.profile), good)
        dry = env.build("dry")
        gen = env.publish("m1", dry, "--action", "dry-activate")
        s = env.wait_phase("m1", gen, "succeeded")
        self.assertIn("nothing was changed", s["detail"])
        self.assertEqual(a.current_system(), t)
        self.assertEqual(env.activation_log()[-1], "dry dry-activate nixos")

    def test_agent_killed_while_realising_resumes_and_succeeds(self):
        env = self.env.start()
        # A nix-store that stalls while a flag file exists, so the agent can be
        # killed mid-realise.
        stall = os.path.join(env.root, "stall")
        bindir = os.path.join(env.root, "nixbin")
        os.makedirs(bindir)
        real = "/usr/bin/nix-store"  # a symlink: nix dispatches on argv[0]
        with open(os.path.join(bindir, "nix-store"), "w") as f:
            f.write(f"#!/bin/sh\nwhile [ -e {stall} ]; do sleep 0.1; done\nexec {real} \"$@\"\n")
        os.chmod(os.path.join(bindir, "nix-store"), 0o755)
        os.symlink("/usr/bin/nix-env", os.path.join(bindir, "nix-env"))
        a = env.add_agent("m1", nixBinDir=bindir).start()
        a.wait_connected()
        open(stall, "w").close()
        top = env.build("slowrealise")
        gen = env.publish("m1", top)
        env.wait_phase("m1", gen, "realising")
        a.kill()
        os.unlink(stall)
        self.assertEqual(a.state_json()["current"]["phase"], "realising")
        a.start()
        s = env.wait_phase("m1", gen, "succeeded")
        self.assertEqual(a.current_system(), top)
        self.assertEqual(env.activation_log(), ["slowrealise switch nixos"])

    def test_agent_killed_while_activating_learns_the_outcome_on_restart(self):
        env = self.env.start()
        a = env.add_agent("m1").start()
        good, _ = self.deploy_good(a)
        slow = env.build("slowactivate", sleep=3)
        gen = env.publish("m1", slow)
        env.wait_phase("m1", gen, "activating")
        a.kill()  # the activation (its own process group) carries on
        wait_until(lambda: a.current_system() == slow, 20, what="activation to finish")
        a.start()
        s = env.wait_phase("m1", gen, "succeeded")
        self.assertEqual(env.activation_log(), ["good switch nixos", "slowactivate switch nixos"])
        phases = env.events("m1", gen)
        self.assertIn("confirming", phases)
        self.assertIn("confirmed", s["detail"])


if __name__ == "__main__":
    unittest.main()
