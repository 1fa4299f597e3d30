"""The roster and the operators are operators' data: attacks a compromised
controller can try by rewriting its own database, each refused by the CLI (or
the agent) with a message that says what happened, and a good deploy still
working afterwards. See docs/SECURITY.md for the claim each test backs."""
import json
import os
import sqlite3
import subprocess
import time
import unittest

from harness import EnvTest, binary, wait_until


class TrustTest(EnvTest):
    def setUp(self):
        super().setUp()
        env = self.env.start()
        self.good = env.add_agent("good", tags=["web"]).start()
        self.good.wait_connected()
        self.top = env.build("trusted")
        self.vars = os.path.join(env.root, "secret-vars")
        os.makedirs(os.path.join(self.vars, "activation"), exist_ok=True)
        with open(os.path.join(self.vars, "activation", "token"), "w") as f:
            f.write("s3cret\n")

    def db(self):
        return sqlite3.connect(os.path.join(self.env.ctl_dir, "muster.db"), timeout=10)

    def sql(self, query, *args):
        with self.db() as c:
            return c.execute(query, args).fetchall()

    def generations(self, machine):
        return self.sql("SELECT generation FROM generations WHERE machine = ?", machine)

    def rogue_operator(self):
        """An operator key the controller registered on its own: the CLI of
        alice has never been told to trust it."""
        env = self.env
        key = os.path.join(env.root, "rogue.key")
        pub = subprocess.run([binary("muster"), "--key", key, "key", "generate"],
                             capture_output=True, text=True, check=True).stdout.strip()
        self.sql("INSERT INTO operators (name, key, created_at) VALUES ('mallory', ?, 0)", pub)
        wait_until(lambda: env.cli("status", key=key, check=False).returncode == 0, 10,
                   what="rogue operator admitted")
        return key

    def assert_good_deploy(self):
        env = self.env
        gen = env.publish("good", self.top, "--force", "--vars", self.vars)
        env.wait_phase("good", gen, "succeeded")
        with open(os.path.join(self.good.vars, "activation", "token")) as f:
            self.assertEqual(f.read(), "s3cret\n")

    # ------------------------------------------------------------ key swaps
    def test_key_column_swap_does_not_redirect_sealing(self):
        """The CLI seals to the key in the signed entry, not to the key the
        controller reports beside it."""
        env = self.env
        rogue = subprocess.run([binary("muster"), "--key", os.path.join(env.root, "m.key"),
                                "key", "generate"], capture_output=True, text=True,
                               check=True).stdout.strip()
        self.sql("UPDATE machines SET key = ? WHERE name = 'good'", rogue)
        got = json.loads(env.cli("machine", "list", "--json").stdout)
        self.assertEqual(got[0]["key"], rogue)  # the controller lies…
        # …but the vars are sealed to the signed key, which the agent holds: the
        # deploy succeeds (the agent still connects with its real key, cached).
        gen = env.publish("good", self.top, "--vars", self.vars)
        env.wait_phase("good", gen, "succeeded")
        with open(os.path.join(self.good.vars, "activation", "token")) as f:
            self.assertEqual(f.read(), "s3cret\n")

    def test_altered_entry_is_refused_before_anything_is_sealed(self):
        env = self.env
        rogue = subprocess.run([binary("muster"), "--key", os.path.join(env.root, "m.key"),
                                "key", "generate"], capture_output=True, text=True,
                               check=True).stdout.strip()
        (roster,) = self.sql("SELECT roster FROM machines WHERE name = 'good'")[0]
        signed = json.loads(roster)
        entry = json.loads(signed["entry"])
        entry["key"] = rogue
        signed["entry"] = json.dumps(entry, separators=(",", ":"))
        self.sql("UPDATE machines SET roster = ?, key = ? WHERE name = 'good'",
                 json.dumps(signed), rogue)
        before = self.generations("good")
        r = env.publish("good", self.top, "--vars", self.vars, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("machine 'good' cannot be trusted", r.stderr)
        self.assertIn("invalid signature", r.stderr)
        self.assertEqual(self.generations("good"), before)  # nothing was sent
        # Restore the honest row: deploys work again.
        self.sql("UPDATE machines SET roster = ?, key = ? WHERE name = 'good'", roster,
                 self.good.public_key())
        self.assert_good_deploy()

    def test_entry_signed_by_an_untrusted_operator_is_refused(self):
        env = self.env
        rogue_op = self.rogue_operator()
        mkey = subprocess.run([binary("muster"), "--key", os.path.join(env.root, "m.key"),
                               "key", "generate"], capture_output=True, text=True,
                              check=True)
        rogue_machine = mkey.stdout.strip()
        # The controller swaps the key and has its own operator sign it.
        self.sql("UPDATE machines SET key = ? WHERE name = 'good'", rogue_machine)
        r = env.cli("machine", "sign", "good", "--yes", key=rogue_op)
        self.assertIn("signed", r.stdout)
        before = self.generations("good")
        r = env.publish("good", self.top, "--vars", self.vars, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("which this CLI does not trust", r.stderr)
        self.assertIn("trustedOperatorKeys", r.stderr)
        self.assertEqual(self.generations("good"), before)
        # An operator who checks the fingerprint re-signs the real key.
        real_fp = subprocess.run([binary("muster-agent"), "--config", self.good.config_path,
                                  "--print-key"], capture_output=True, text=True,
                                 check=True).stderr.split()[-1]
        self.sql("UPDATE machines SET key = ? WHERE name = 'good'", self.good.public_key())
        r = env.cli("machine", "sign", "good", "--fingerprint", real_fp)
        self.assertIn(real_fp, r.stdout)
        self.assert_good_deploy()

    def test_sign_refuses_a_key_whose_fingerprint_differs(self):
        env = self.env
        r = env.cli("machine", "sign", "good", "--fingerprint", "sha256:" + "0" * 64, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("not the expected", r.stderr)
        r = env.cli("machine", "sign", "good", check=False)  # no terminal, no --yes
        self.assertEqual(r.returncode, 2)
        self.assertIn("without checking its key", r.stderr)

    # ----------------------------------------------------------------- tags
    def test_tag_injection_and_invented_machines_are_not_targets(self):
        env = self.env
        other = env.add_agent("other", tags=["db"]).start()
        other.wait_connected()
        # The controller adds the tag to 'other' and invents a machine.
        self.sql("UPDATE machines SET tags = '[\"web\"]' WHERE name = 'other'")
        self.sql("INSERT INTO machines (name, key, tags, created_at) VALUES "
                 "('ghost', 'ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', '[\"web\"]', 0)")
        r = env.cli("publish", "--tag", "web", self.top, "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        self.assertIn("publishing to 1 machine", r.stderr)
        self.assertRegex(r.stderr, r"\n  good  sha256:[0-9a-f]{64}\n")
        self.assertNotIn("  other  ", r.stderr)
        self.assertIn("not considered: ghost: unsigned", r.stderr)
        gen = int(r.stdout.split("generation ")[1].split(":")[0])
        env.wait_phase("good", gen, "succeeded")
        self.assertEqual(self.generations("other"), [])
        self.assertEqual(self.generations("ghost"), [])
        # --all: the same, only signed machines.
        r = env.cli("publish", "--all", self.top, "--force", "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        self.assertIn("publishing to 2 machines", r.stderr)
        self.assertEqual(self.generations("ghost"), [])
        # An altered signed entry (tag added to the signed text) is refused too.
        (roster,) = self.sql("SELECT roster FROM machines WHERE name = 'other'")[0]
        signed = json.loads(roster)
        signed["entry"] = signed["entry"].replace('"db"', '"web"')
        self.sql("UPDATE machines SET roster = ? WHERE name = 'other'", json.dumps(signed))
        r = env.cli("publish", "--tag", "web", self.top, "--force", "--substituter",
                    env.cache.url, "--trusted-public-key", env.cache.public)
        self.assertIn("publishing to 1 machine", r.stderr)
        self.assertIn("not considered: other: roster entry for machine 'other' has an invalid "
                      "signature", r.stderr)

    def test_replayed_older_entry_is_refused(self):
        """After a retag, the controller serves the entry from before it."""
        env = self.env
        (old,) = self.sql("SELECT roster FROM machines WHERE name = 'good'")[0]
        env.cli("machine", "tag", "good", "--tag", "retired")
        self.sql("UPDATE machines SET roster = ?, tags = '[\"web\"]' WHERE name = 'good'", old)
        r = env.cli("publish", "--tag", "web", self.top, check=False)
        self.assertEqual(r.returncode, 2, r.stderr)  # no targets
        self.assertIn("older than one this CLI saw", r.stderr)

    def test_publish_to_several_machines_asks_on_a_terminal(self):
        import pty
        env = self.env
        other = env.add_agent("other", tags=["web"]).start()
        other.wait_connected()

        def on_tty(answer, *extra):
            pid, fd = pty.fork()
            if pid == 0:  # child: the CLI on a pseudo-terminal
                os.execve(binary("muster"), [binary("muster"), "--config",
                                             os.path.join(env.cli_dir, "config.json"), "publish",
                                             "--tag", "web", self.top, "--substituter",
                                             env.cache.url, "--trusted-public-key",
                                             env.cache.public, *extra], env.cli_env())
            out = b""
            sent = False
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
                if not sent and b"[y/N]" in out:
                    os.write(fd, answer)
                    sent = True
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), out.decode(errors="replace")

        code, text = on_tty(b"n\n")
        self.assertEqual(code, 1, text)
        self.assertIn("Publish to these 2 machines?", text)
        self.assertRegex(text, r"  good  sha256:[0-9a-f]{64}")
        self.assertRegex(text, r"  other  sha256:[0-9a-f]{64}")
        self.assertIn("not published", text)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM rollouts")[0][0], 0)
        code, text = on_tty(b"y\n")
        self.assertEqual(code, 0, text)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM rollouts")[0][0], 1)
        code, text = on_tty(b"", "--yes", "--force")
        self.assertEqual(code, 0, text)
        self.assertNotIn("[y/N]", text)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM rollouts")[0][0], 2)

    def test_revocation_is_signed_and_cannot_be_undone_by_the_controller(self):
        env = self.env
        (before,) = self.sql("SELECT roster FROM machines WHERE name = 'good'")[0]
        r = env.cli("machine", "revoke", "good")
        self.assertIn("revoked", r.stdout)
        wait_until(lambda: not env.status("good")["online"], 20, what="good disconnected")
        # The controller un-revokes the machine and serves the signed revocation
        # without its flag: the CLI still refuses to seal to the key.
        self.sql("UPDATE machines SET revoked = 0 WHERE name = 'good'")
        r = env.publish("good", self.top, "--vars", self.vars, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("is revoked: an operator signed that its key must not be trusted", r.stderr)
        # Nor can it bring back the entry from before the revocation.
        self.sql("UPDATE machines SET roster = ? WHERE name = 'good'", before)
        r = env.publish("good", self.top, "--vars", self.vars, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("older than one this CLI saw", r.stderr)
        self.assertEqual(self.generations("good"), [])

    # ----------------------------------------------------- generation numbers
    def test_steered_generation_numbers_are_refused_without_overflow(self):
        env = self.env
        for steered in (2**63 - 2, 2**63 - 1, int(time.time())):
            self.sql("DELETE FROM generations WHERE machine = 'good' AND generation > 100")
            self.sql("INSERT INTO generations (machine, generation, manifest, signer, signature, "
                     "vars, toplevel, action, created_at, released) VALUES "
                     "('good', ?, '{}', 'x', 'x', '', ?, 'switch', 0, 0)", steered, self.top)
            r = env.publish("good", self.top, check=False)
            self.assertEqual(r.returncode, 1, f"{steered}: {r.stdout} {r.stderr}")
            self.assertRegex(r.stderr, r"impossible generation number|looks steered")
            self.assertNotIn("-9223372036854775808", r.stderr)
        self.sql("DELETE FROM generations WHERE machine = 'good' AND generation > 100")
        self.assert_good_deploy()

    # ------------------------------------------------------------ enrolment
    def test_enrolment_binding_cannot_be_forged_by_the_controller(self):
        env = self.env
        r = env.cli("machine", "enroll", "edge", "--tag", "edge", "--ttl", "300")
        token = r.stdout.strip()
        tok = os.path.join(env.root, "token")
        with open(tok, "w") as f:
            f.write(token + "\n")
        edge = env.add_agent("edge", register=False, enrollTokenFile=tok).start()
        edge.proc.wait_log(r"enrolled as machine edge", timeout=20)
        edge.wait_connected()
        listed = {m["name"]: m for m in json.loads(env.cli("machine", "list", "--json").stdout)}
        self.assertTrue(listed["edge"]["trusted"], listed["edge"])
        with open(os.path.join(env.ctl_dir, "muster.db"), "rb") as f:
            self.assertNotIn(token, f.read().decode("latin-1"))
        # The enrolled key is trusted through the grant: vars reach it.
        top = env.build("edge-top")
        gen = env.publish("edge", top, "--vars", self.vars)
        env.wait_phase("edge", gen, "succeeded")
        # A controller that swaps in its own key cannot sign the binding.
        rogue = subprocess.run([binary("muster"), "--key", os.path.join(env.root, "m.key"),
                                "key", "generate"], capture_output=True, text=True,
                               check=True).stdout.strip()
        (binding,) = self.sql("SELECT binding FROM machines WHERE name = 'edge'")[0]
        b = json.loads(binding)
        b["key"] = rogue
        self.sql("UPDATE machines SET binding = ?, key = ? WHERE name = 'edge'", json.dumps(b),
                 rogue)
        before = self.generations("edge")
        r = env.publish("edge", top, "--force", "--vars", self.vars, check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("not signed by the key of the token", r.stderr)
        self.assertEqual(self.generations("edge"), before)
        self.assert_good_deploy()

    def test_unsigned_machines_from_before_signed_rosters(self):
        """A store migrated from before signed rosters: machines are listed as
        unsigned and refused until an operator signs them."""
        env = self.env
        self.sql("UPDATE machines SET roster = '' WHERE name = 'good'")
        out = env.cli("machine", "list").stdout
        self.assertRegex(out, r"good\s+\(web\)\s+yes\s+sha256:\S+\s+UNSIGNED")
        r = env.publish("good", self.top, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("unsigned", r.stderr)
        self.assertIn("muster machine sign good", r.stderr)
        fp = subprocess.run([binary("muster-agent"), "--config", self.good.config_path,
                             "--print-key"], capture_output=True, text=True,
                            check=True).stderr.split()[-1]
        env.cli("machine", "sign", "good", "--fingerprint", fp)
        listed = json.loads(env.cli("machine", "list", "--json").stdout)
        self.assertEqual(listed[0]["tags"], ["web"])
        self.assert_good_deploy()

    # ------------------------------------------------------------ operators
    def test_removed_operator_is_refused_at_once_and_its_sessions_close(self):
        env = self.env
        bob_key = os.path.join(env.root, "bob.key")
        bob_pub = subprocess.run([binary("muster"), "--key", bob_key, "key", "generate"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run([binary("muster-controller"), "operator", "add", "bob", "--key", bob_pub,
                        "--state-dir", env.ctl_dir], check=True, capture_output=True)
        wait_until(lambda: env.cli("status", key=bob_key, check=False).returncode == 0, 10,
                   what="bob admitted")
        follow = subprocess.Popen([binary("muster"), "--config",
                                   os.path.join(env.cli_dir, "config.json"), "--key", bob_key,
                                   "logs", "good", "-f"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env.cli_env())
        try:
            time.sleep(0.5)  # let the follower subscribe
            self.assertIsNone(follow.poll())
            r = env.cli("operator", "remove", "bob")
            self.assertIn("removed", r.stdout)
            follow.wait(timeout=10)
            self.assertNotEqual(follow.returncode, 0)
        finally:
            follow.kill()
            follow.communicate()
        r = env.cli("status", key=bob_key, check=False)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn("refused", r.stderr)
        ops = json.loads(env.cli("operator", "list", "--json").stdout)
        self.assertEqual([o["name"] for o in ops], ["alice"])
        # The last operator cannot be removed.
        r = env.cli("operator", "remove", "alice", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("last operator", r.stderr)
        # Removal beside a running controller (local command) takes effect too.
        subprocess.run([binary("muster-controller"), "operator", "add", "carol", "--key",
                        bob_pub, "--state-dir", env.ctl_dir], check=True, capture_output=True)
        wait_until(lambda: env.cli("status", key=bob_key, check=False).returncode == 0, 10,
                   what="carol admitted")
        subprocess.run([binary("muster-controller"), "operator", "remove", "carol",
                        "--state-dir", env.ctl_dir], check=True, capture_output=True)
        wait_until(lambda: env.cli("status", key=bob_key, check=False).returncode == 3, 10,
                   what="carol refused")
        self.assert_good_deploy()


if __name__ == "__main__":
    unittest.main()
