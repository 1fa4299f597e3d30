"""Preview before go: `muster publish … --preview` and `muster rollout preview`
ask each online target to fetch the closure and dry-activate it, and report per
machine (download, store paths added/removed, package versions, units, reboot)
and across the fleet. Nothing is published and nothing on the machines changes."""
import json
import os
import subprocess

from harness import EnvTest, binary, nix_env


def valid(path):
    return subprocess.run(["nix-store", "--check-validity", path], capture_output=True,
                          env=nix_env()).returncode == 0


class PreviewTest(EnvTest):
    def cache_args(self):
        return ["--substituter", self.env.cache.url, "--trusted-public-key", self.env.cache.public]

    def snapshot(self, a):
        files = []
        for root, _, names in os.walk(a.vars):
            files += [os.path.join(root, n) for n in names]
        st = a.state_json()
        return {"current": a.current_system(), "profile": os.path.realpath(a.profile),
                "vars": sorted(files), "generation": st["current"]["manifest"],
                "lastApplied": st["lastApplied"], "status": self.env.status(a.name)["generation"]}

    def test_preview_reports_changes_per_machine_and_in_sum_and_changes_nothing(self):
        env = self.env.start()
        agents = [env.add_agent(n, tags=["fleet"]).start() for n in ("m1", "m2")]
        env.add_agent("m3", tags=["fleet"])  # registered, never started: offline
        for a in agents:
            a.wait_connected()
        base = env.build("base", kernel="6.1.0")
        vars_dir = os.path.join(env.root, "vars-in")
        os.makedirs(vars_dir)
        with open(os.path.join(vars_dir, "secret"), "w") as f:
            f.write("s3cret\n")
        env.cli("publish", "m1", "m2", base, "--vars", vars_dir, *self.cache_args(), "--wait",
                "--timeout", "120")
        for a in agents:
            os.symlink(base, a.booted)  # booted into base: a new kernel needs a reboot
        before = {a.name: self.snapshot(a) for a in agents}
        self.assertEqual(before["m1"]["current"], base)
        history = {a.name: len(env.history(a.name)) for a in agents}

        nxt = env.build("next", kernel="6.2.0", payload=1 << 16,
                        restartUnits="sshd.service, nginx.service", startUnits="new.service",
                        reloadUnits="dbus.service", stopUnits="old.service")
        self.assertFalse(valid(nxt))
        # One machine first: the agents share this test's store, so only the first
        # preview finds the whole closure missing.
        r = env.cli("--json", "publish", "m1", nxt, "--preview", *self.cache_args(),
                    "--timeout", "120")
        one = json.loads(r.stdout)["machines"][0]
        self.assertEqual(one["error"], "", one)
        self.assertEqual(one["fetchPaths"], 3, one)  # toplevel, kernel, payload
        self.assertGreater(one["downloadBytes"], 0)
        self.assertGreaterEqual(one["unpackedBytes"], 1 << 16)
        self.assertTrue(valid(nxt), "the closure was fetched (download only)")
        self.assertEqual(self.snapshot(agents[0]), before["m1"])

        r = env.cli("--json", "publish", "--tag", "fleet", nxt, "--preview", *self.cache_args(),
                    "--timeout", "120")
        out = json.loads(r.stdout)
        self.assertEqual(out["offline"], ["m3"])
        self.assertEqual(out["noAnswer"], [])
        machines = {m["machine"]: m for m in out["machines"]}
        self.assertEqual(sorted(machines), ["m1", "m2"])
        for name, m in machines.items():
            self.assertEqual(m["error"], "", m)
            self.assertEqual(m["toplevel"], nxt)
            self.assertEqual(m["current"], base)
            self.assertEqual(m["addedCount"], 3, m)
            self.assertEqual(m["removedCount"], 2, m)  # old toplevel and kernel
            self.assertIn(os.path.basename(nxt)[33:], m["added"])
            self.assertIn("muster-test-kernel-6.1.0", m["removed"])
            self.assertIn({"name": "muster-test-kernel", "before": "6.1.0", "after": "6.2.0"},
                          m["versions"])
            self.assertEqual(m["units"], {"stop": ["old.service"], "reload": ["dbus.service"],
                                          "restart": ["sshd.service", "nginx.service"],
                                          "start": ["new.service"]})
            self.assertTrue(m["rebootRequired"])
        s = out["summary"]
        self.assertEqual(s["previewed"], 2)
        self.assertEqual(s["rebootRequired"], 2)
        self.assertEqual(s["units"]["restart"], {"sshd.service": 2, "nginx.service": 2})

        # Nothing changed: no generation, profile, current system, vars or agent
        # state moved.
        for a in agents:
            self.assertEqual(self.snapshot(a), before[a.name], a.name)
            self.assertEqual(len(env.history(a.name)), history[a.name], "nothing was published")
        self.assertNotIn("next switch nixos", env.activation_log())

        # The same as an operator reads it, through 'rollout preview'.
        r = env.cli("rollout", "preview", "--tag", "fleet", nxt, *self.cache_args(),
                    "--timeout", "120")
        self.assertIn("m1: download ", r.stdout)
        self.assertIn("muster-test-kernel 6.1.0 -> 6.2.0", r.stdout)
        self.assertIn("would restart: sshd.service, nginx.service", r.stdout)
        self.assertIn("2 machines will restart sshd.service", r.stdout)
        self.assertIn("2 machines will stop old.service", r.stdout)
        self.assertIn("2 machines will need a reboot", r.stdout)
        self.assertIn("m3: offline, not previewed", r.stdout)
        for a in agents:
            self.assertEqual(self.snapshot(a), before[a.name], a.name)

    def test_an_agent_refuses_a_preview_signed_by_a_key_it_does_not_trust(self):
        env = self.env.start()
        other = os.path.join(env.root, "other.key")
        pub = subprocess.run([binary("muster"), "key", "generate", "--out", other],
                             capture_output=True, text=True, check=True).stdout.strip()
        a = env.add_agent("m1", trustedOperatorKeys=[pub]).start()
        a.wait_connected()
        top = env.build("unasked")
        r = env.cli("--json", "publish", "m1", top, "--preview", *self.cache_args(),
                    "--timeout", "60", check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        m = json.loads(r.stdout)["machines"][0]
        self.assertIn("refused: preview request is signed by unknown key", m["error"])
        self.assertFalse(valid(top), "nothing was fetched")
