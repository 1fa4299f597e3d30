"""Free space before a deploy: the agent asks nix what a realise would fetch
and refuses, as a failed deploy with the reason, when the store's file system
(or /boot, for a new kernel and initrd) would not keep its reserve free.
Nothing is fetched and nothing changes."""
import os
import subprocess

from harness import EnvTest, nix_env


def valid(path):
    return subprocess.run(["nix-store", "--check-validity", path], capture_output=True,
                          env=nix_env()).returncode == 0


class FreeSpaceTest(EnvTest):
    def test_store_too_full_refuses_before_fetching(self):
        env = self.env.start()
        # A reserve no disk has: 1 PiB must stay free after the fetch.
        a = env.add_agent("m1", minFreeStoreMiB=1 << 30).start()
        a.wait_connected()
        top = env.build("too-big", payload=1 << 20)
        self.assertFalse(valid(top))
        gen = env.publish("m1", top)
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "failed", s)
        self.assertIn("not enough free space in /nix/store for generation %d of m1" % gen,
                      s["detail"])
        self.assertRegex(s["detail"], r"it needs [0-9.]+ [KM]iB, [0-9.]+ [GT]iB are free and "
                                      r"1048576\.0 GiB must stay free")
        self.assertIn("nothing was changed", s["detail"])
        self.assertIn("minFreeStoreMiB", s["detail"])
        # The realise never ran: not a byte of the closure was fetched.
        self.assertFalse(valid(top), "the closure must not have been fetched")
        self.assertIsNone(a.current_system())
        self.assertEqual(env.activation_log(), [])
        events = env.events("m1", gen)
        for changed in ("vars-installed", "profile-set", "activating"):
            self.assertNotIn(changed, events)

        # With room (the default reserve), the same machine deploys: the check
        # measured the closure and let it through.
        a.stop()
        a.cfg.pop("minFreeStoreMiB")
        a.write_config()
        a.start()
        a.wait_connected()
        gen2 = env.publish("m1", top)
        s = env.wait_phase("m1", gen2, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s)
        self.assertEqual(a.current_system(), top)
        logs = env.cli("logs", "m1", "--generation", str(gen2), check=False).stdout
        self.assertRegex(logs, r"[0-9]+ store paths to fetch: [0-9.]+ [KM]iB download, "
                               r"[0-9.]+ [KM]iB unpacked; [0-9.]+ [GT]iB free in /nix/store")

    def test_boot_too_small_for_a_new_kernel_refuses_and_keeps_the_old_system(self):
        env = self.env.start()
        boot = os.path.join(env.root, "boot")
        os.makedirs(boot)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", boot],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.skipTest("cannot mount a tmpfs here: " + r.stderr.strip())
        self.addCleanup(subprocess.run, ["umount", "-l", boot], capture_output=True)
        a = env.add_agent("m1", bootDir=boot).start()
        a.wait_connected()
        first = env.build("small-kernel", kernel="6.1.0")
        gen1 = env.publish("m1", first)
        self.assertEqual(env.wait_phase("m1", gen1, ["succeeded", "failed"])["phase"],
                         "succeeded")
        # A kernel of 1 MiB does not fit in 256 KiB.
        big = env.build("big-kernel", kernel="6.2.0", kernelSize=1 << 20)
        gen2 = env.publish("m1", big)
        s = env.wait_phase("m1", gen2, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "failed", s)
        self.assertIn("not enough free space in %s for the boot entry of generation %d of m1"
                      % (boot, gen2), s["detail"])
        self.assertIn("nothing was changed", s["detail"])
        self.assertEqual(a.current_system(), first, "the running system is untouched")
        self.assertEqual(os.path.realpath(a.profile), first, "the profile is untouched")
        self.assertNotIn("big-kernel switch nixos", env.activation_log())
        # The same kernel as the running system needs no room in /boot.
        same = env.build("same-kernel", kernel="6.1.0")
        gen3 = env.publish("m1", same)
        self.assertEqual(env.wait_phase("m1", gen3, ["succeeded", "failed"])["phase"],
                         "succeeded")
        # dry-activate installs no boot entry: not checked.
        gen4 = env.publish("m1", big, "--action", "dry-activate")
        self.assertEqual(env.wait_phase("m1", gen4, ["succeeded", "failed"])["phase"],
                         "succeeded")
        self.assertEqual(a.current_system(), same)
