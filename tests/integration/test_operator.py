"""Operator experience: staged rollouts, live progress, logs, revocation,
enrolment, metrics and publishing from a flake — each driven as a user would."""
import json
import os
import re
import shutil
import subprocess
import time
import unittest
import urllib.request

from harness import HERE, EnvTest, binary, nix_env, wait_until


class OperatorTest(EnvTest):
    def fleet(self, n, **cfg):
        env = self.env.start()
        agents = [env.add_agent(f"n{i}", tags=["fleet"], **cfg).start() for i in range(n)]
        for a in agents:
            a.wait_connected()
        return env, agents

    def rollout_id(self, out):
        return re.search(r"rollout (r[0-9a-f]+)", out).group(1)

    def rollout(self, rid):
        return json.loads(self.env.cli("rollout", "status", rid, "--json").stdout)

    def items(self, rid):
        return {i["machine"]: i for i in self.rollout(rid)["items"]}

    def test_failing_canary_halts_and_leaves_the_rest_untouched(self):
        env = self.env.start()
        flag = os.path.join(env.root, "never-exists")
        canary = env.add_agent("c0", tags=["fleet"], confirmTimeout=2, healthChecks=[
            {"name": "broken", "command": ["/usr/bin/test", "-e", flag], "timeout": 2}]).start()
        rest = [env.add_agent(f"n{i}", tags=["fleet"]).start() for i in range(3)]
        for a in [canary] + rest:
            a.wait_connected()
        top = env.build("release")
        r = env.cli("publish", "--machine", "c0", "--tag", "fleet", top, "--canary", "1",
                    "--max-failures", "0", "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public, "--wait", "--timeout", "60", check=False)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("halted", r.stdout)
        rid = self.rollout_id(r.stdout)
        items = self.items(rid)
        self.assertEqual(items["c0"]["stage"], "canary")
        self.assertEqual(items["c0"]["state"], "failed")
        for a in rest:
            self.assertEqual(items[a.name]["state"], "pending")
            self.assertIsNone(a.current_system())
            self.assertEqual(env.status(a.name)["phase"], "idle")
        self.assertEqual(self.rollout(rid)["state"], "halted")
        # Plain (non-terminal) output: timestamped lines naming machine and phase.
        self.assertRegex(r.stdout, r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  c0  gen 1  \[rollout\] released \(canary\)")
        self.assertRegex(r.stdout, r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  c0  gen 1  failed  confirmation timed out: health checks did not pass")
        listing = env.cli("rollout", "list").stdout
        self.assertRegex(listing, rid + r"\s+halted")

    def test_waves_pause_resume_and_watch(self):
        env, agents = self.fleet(3)
        top = env.build("wave")
        r = env.cli("publish", "--tag", "fleet", top, "--max-parallel", "1",
                    "--substituter", env.cache.url, "--trusted-public-key", env.cache.public)
        rid = self.rollout_id(r.stdout)
        env.cli("rollout", "pause", rid)
        wait_until(lambda: sum(i["state"] == "succeeded" for i in self.items(rid).values()) >= 1, 30,
                   what="first wave done")
        time.sleep(0.5)
        items = self.items(rid)
        self.assertEqual(sorted(i["state"] for i in items.values()), ["pending", "pending", "succeeded"])
        self.assertEqual(self.rollout(rid)["state"], "paused")
        env.cli("rollout", "resume", rid)
        w = env.cli("rollout", "watch", rid, "--timeout", "60", check=False)
        self.assertEqual(w.returncode, 0, w.stdout + w.stderr)
        self.assertIn(f"rollout {rid} succeeded", w.stdout)
        for a in agents:
            self.assertEqual(a.current_system(), top)
        # One at a time: no two machines were activating at once.
        events = []
        for a in agents:
            for g in env.history(a.name):
                for e in g["events"]:
                    if e["phase"] in ("verified", "succeeded"):
                        events.append((e["at"], e["phase"], a.name))
        events.sort()
        running = 0
        for _, phase, _ in events:
            running += 1 if phase == "verified" else -1
            self.assertLessEqual(running, 1)

    def test_watch_on_a_terminal_draws_a_progress_bar(self):
        import pty
        env, agents = self.fleet(2)
        top = env.build("tty")
        r = env.cli("publish", "--tag", "fleet", top, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = self.rollout_id(r.stdout)
        pid, fd = pty.fork()
        if pid == 0:  # child: the CLI on a pseudo-terminal
            os.execve(binary("muster"), [binary("muster"), "--config",
                                         os.path.join(env.cli_dir, "config.json"),
                                         "rollout", "watch", rid, "--timeout", "60"], nix_env())
        out = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        text = out.decode(errors="replace")
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, text)
        self.assertRegex(text, r"\[#{30}\] 2/2  succeeded  2 ok  0 failed")
        self.assertIn("\r", text)  # the bar is redrawn in place
        self.assertIn(f"rollout {rid} succeeded", text)

    def test_rollout_larger_than_the_agent_message_cap(self):
        # Four machines with a 300 KiB vars file each: the rollout request is
        # well over the 1 MiB cap for agent messages; operators may send more.
        env, agents = self.fleet(4)
        vdir = os.path.join(env.root, "bigvars")
        os.makedirs(vdir)
        with open(os.path.join(vdir, "blob"), "wb") as f:
            f.write(os.urandom(300 * 1024))
        top = env.build("big")
        r = env.cli("publish", "--tag", "fleet", top, "--vars", vdir, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public, "--wait", "--timeout", "60", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        for a in agents:
            with open(os.path.join(a.vars, "blob"), "rb") as f:
                self.assertEqual(len(f.read()), 300 * 1024)

    def test_offline_machine_catches_up_and_rollout_survives_restart(self):
        env, agents = self.fleet(2)
        late = agents[1]
        late.stop()
        wait_until(lambda: not env.status(late.name)["online"], 30, what="offline")
        top = env.build("catchup")
        r = env.cli("publish", "n0", "n1", top, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = self.rollout_id(r.stdout)
        wait_until(lambda: self.items(rid)["n0"]["state"] == "succeeded", 30, what="n0 done")
        self.assertEqual(self.items(rid)["n1"]["state"], "pending")
        self.assertEqual(self.rollout(rid)["state"], "running")
        env.controller.kill()
        env.start_controller()
        late.start()
        w = env.cli("rollout", "watch", rid, "--timeout", "60", check=False)
        self.assertEqual(w.returncode, 0, w.stdout + w.stderr)
        self.assertEqual(late.current_system(), top)

    def test_abort_cancels_pending_machines(self):
        env, agents = self.fleet(2)
        agents[1].stop()
        wait_until(lambda: not env.status("n1")["online"], 30, what="offline")
        top = env.build("aborted")
        r = env.cli("publish", "n0", "n1", top, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = self.rollout_id(r.stdout)
        wait_until(lambda: self.items(rid)["n0"]["state"] == "succeeded", 30, what="n0 done")
        env.cli("rollout", "abort", rid)
        self.assertEqual(self.items(rid)["n1"]["state"], "cancelled")
        agents[1].start()
        agents[1].wait_connected()
        time.sleep(1)
        self.assertIsNone(agents[1].current_system())
        self.assertEqual(env.status("n1")["targetGeneration"], 0)
        w = env.cli("rollout", "watch", rid, check=False)
        self.assertEqual(w.returncode, 1)

    def test_logs_show_activation_output_and_follow(self):
        env, (a,) = self.fleet(1)
        top = env.build("logged")
        gen = env.publish("n0", top)
        env.wait_phase("n0", gen, "succeeded")
        out = wait_until(lambda: (lambda o: o if "activating logged" in o else None)(env.cli("logs", "n0").stdout),
                         10, what="activation output in logs")
        self.assertIn("[activate] activating logged (nixos) action switch", out)
        follow = subprocess.Popen([binary("muster"), "--config", os.path.join(env.cli_dir, "config.json"),
                                   "logs", "n0", "-f"], stdout=subprocess.PIPE, env=nix_env())
        try:
            top2 = env.build("logged2")
            gen2 = env.publish("n0", top2)
            env.wait_phase("n0", gen2, "succeeded")
            deadline = time.monotonic() + 15
            seen = ""
            os.set_blocking(follow.stdout.fileno(), False)
            while time.monotonic() < deadline and "activating logged2" not in seen:
                chunk = follow.stdout.read()
                if chunk:
                    seen += chunk.decode(errors="replace")
                time.sleep(0.1)
            self.assertIn("activating logged2", seen)
        finally:
            follow.kill()
            follow.wait()
        j = env.cli("logs", "n0", "--generation", str(gen), "--json").stdout.splitlines()
        self.assertTrue(any(json.loads(l)["stream"] == "activate" for l in j))

    def test_revoke_closes_the_connection_and_refuses_the_key(self):
        env, (a,) = self.fleet(1)
        t0 = time.monotonic()
        env.cli("machine", "revoke", "n0")
        a.proc.wait_log(r"closed by the controller: machine key was revoked|connection lost", timeout=5)
        self.assertLess(time.monotonic() - t0, 5)
        a.proc.wait_log(r"the controller refused this key during the TLS handshake", timeout=10)
        s = env.status("n0")
        self.assertTrue(s["revoked"])
        self.assertFalse(s["online"])
        r = env.cli("publish", "n0", env.build("x", push=False, delete=False), check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("revoked", r.stderr)

    def test_enrolment_token_registers_once(self):
        env = self.env.start()
        r = env.cli("machine", "enroll", "newbie", "--tag", "new", "--ttl", "300")
        token = r.stdout.strip()
        self.assertTrue(token.startswith("mtok2_"))
        tok = os.path.join(env.root, "token")
        with open(tok, "w") as f:
            f.write(token + "\n")
        a = env.add_agent("newbie", register=False, enrollTokenFile=tok).start()
        a.proc.wait_log(r"enrolled as machine newbie", timeout=20)
        a.wait_connected()
        st = env.status("newbie")
        self.assertEqual(st["tags"], ["new"])
        self.assertEqual(st["key"], a.public_key())
        gen = env.publish("newbie", env.build("fresh"))
        env.wait_phase("newbie", gen, "succeeded")
        # The same token cannot register another key.
        b = env.add_agent("newbie2", register=False, enrollTokenFile=tok)
        b.cfg["machine"] = "newbie"
        b.write_config()
        b.start()
        b.proc.wait_log(r"enrolment of newbie refused by the controller: .*(already used|already registered)|the controller refused this key", timeout=20)
        self.assertEqual(env.status("newbie")["key"], a.public_key())
        self.assertNotIn(token, open(os.path.join(env.ctl_dir, "muster.db"), "rb").read().decode("latin-1"))

    def test_metrics_endpoint(self):
        env = self.env
        env.init_controller()
        env.start_controller(extra=["--metrics-listen", "127.0.0.1:0"])
        port = int(env.controller.wait_log(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        a = env.add_agent("m0", metricsListen="127.0.0.1:0").start()
        a.wait_connected()
        aport = int(a.proc.wait_log(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        gen = env.publish("m0", env.build("metered"))
        env.wait_phase("m0", gen, "succeeded")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        self.assertEqual(values["muster_agents_connected"], 1)
        self.assertEqual(values['muster_machines_by_phase{phase="succeeded"}'], 1)
        self.assertEqual(values["muster_deploy_duration_seconds_count"], 1)
        self.assertGreaterEqual(values["muster_handshakes_total"], 1)
        self.assertEqual(values["muster_publishes_total"], 1)
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
        self.assertEqual(health, b"ok\n")
        agent = urllib.request.urlopen(f"http://127.0.0.1:{aport}/metrics", timeout=5).read().decode()
        self.assertIn("\nmuster_agent_connected 1\n", agent)
        self.assertIn('\nmuster_agent_deploys_total{result="succeeded"} 1\n', agent)
        self.assertIn("\nmuster_agent_last_applied_generation 1\n", agent)

    def test_publish_from_a_flake(self):
        env, (a,) = self.fleet(1)
        flake = os.path.join(env.root, "infra")
        os.makedirs(flake)
        shutil.copy(os.path.join(HERE, "toplevel.nix"), os.path.join(flake, "toplevel.nix"))
        system = subprocess.run(["nix", "eval", "--raw", "--impure", "--expr", "builtins.currentSystem"],
                                capture_output=True, text=True, env=nix_env(), check=True).stdout
        with open(os.path.join(flake, "flake.nix"), "w") as f:
            f.write(f'''{{
  outputs = {{ self }}: {{
    nixosConfigurations.n0.config.system.build.toplevel = import ./toplevel.nix {{
      name = "fromflake"; system = "{system}"; log = "{env.root}/activation.log";
      salt = "{env.salt}";
    }};
  }};
}}
''')
        cache = env.ensure_cache()
        r = env.cli("publish", "--flake", f"path:{flake}#n0", "--cache", cache.url,
                    "--cache-key", cache.secret, "--wait", "--timeout", "120", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("[n0] built /nix/store/", r.stderr)
        self.assertIn("[n0] copying to " + cache.url, r.stderr)
        self.assertIn("succeeded", r.stdout)
        self.assertTrue(a.current_system().endswith("-muster-test-fromflake"))
        self.assertEqual(env.activation_log(), ["fromflake switch nixos"])


if __name__ == "__main__":
    unittest.main()
