"""No downgrade, no freeze: the agent's replay floor against a compromised
controller. The controller's SQLite database is rewritten behind its back the
way a compromised controller would serve it; manifests are signed only by the
operator key (by the CLI, or here with openssl where the CLI cannot produce
what the test needs)."""
import base64
import json
import os
import sqlite3
import subprocess
import time
import unittest

from harness import EnvTest

SIG_DOMAIN = b"muster-manifest-v1\n"
SECRET_HEADER = "muster-secret-key-v1 ed25519 "
# PKCS#8 prefix of an Ed25519 private key (RFC 8410); the 32-byte seed follows.
ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


def sign_with_operator_key(key_path, manifest_text, workdir):
    """Signs manifest text exactly as the CLI does, with openssl (already used
    by rawclient.py), from the CLI's own key file."""
    with open(key_path) as f:
        text = f.read().strip()
    assert text.startswith(SECRET_HEADER), f"unexpected key file format in {key_path}"
    seed = base64.b64decode(text[len(SECRET_HEADER):])
    der = ED25519_PKCS8_PREFIX + seed
    pem = os.path.join(workdir, "op-signing.pem")
    msg = os.path.join(workdir, "manifest-to-sign")
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(der).decode() +
                "\n-----END PRIVATE KEY-----\n")
    with open(msg, "wb") as f:
        f.write(SIG_DOMAIN + manifest_text.encode())
    sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", pem, "-in", msg],
                         check=True, capture_output=True).stdout
    os.unlink(pem)
    return base64.b64encode(sig).decode()


class FloorTest(EnvTest):
    def db(self):
        return sqlite3.connect(os.path.join(self.env.ctl_dir, "muster.db"), timeout=10)

    def generation_row(self, machine, generation):
        with self.db() as db:
            cur = db.execute("SELECT * FROM generations WHERE machine=? AND generation=?",
                             (machine, generation))
            row = cur.fetchone()
            self.assertIsNotNone(row, f"{machine} generation {generation} is not stored")
            return dict(zip([d[0] for d in cur.description], row))

    def insert_row(self, row):
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db() as db:
            db.execute(f"INSERT INTO generations ({cols}) VALUES ({marks})", tuple(row.values()))

    def test_downgrade_by_number_steering_is_refused(self):
        env = self.env.start()
        victim = env.add_agent("victim")  # registered, not running yet
        old = env.build("old")
        fix = env.build("fix")
        # The controller reports maxGeneration 999 (a fake, unreleased row), so
        # the CLI signs the old closure as generation 1000.
        placeholder = {"machine": "victim", "generation": 999, "manifest": "{}", "signer": "",
                       "signature": "", "vars": "", "toplevel": old, "action": "switch",
                       "rollout": "", "published_by": "alice", "created_at": 0, "released": 0}
        self.insert_row(placeholder)
        self.assertEqual(env.publish("victim", old), 1000)
        held = self.generation_row("victim", 1000)
        t1 = json.loads(held["manifest"])["createdAt"]
        with self.db() as db:  # held back: the CLI now sees no generation at all
            db.execute("DELETE FROM generations WHERE machine='victim'")
        time.sleep(max(0.0, t1 + 1 - time.time()))  # the fix must be signed a second later
        victim.start()
        victim.wait_connected()
        self.assertEqual(env.publish("victim", fix), 1)
        env.wait_phase("victim", 1, "succeeded")
        self.assertEqual(victim.current_system(), fix)

        # Release the held-back generation 1000 and make the agent receive it.
        held["released"] = 1
        self.insert_row(held)
        env.controller.stop()
        env.start_controller()
        s = env.wait_phase("victim", 1000, "refused")
        self.assertIn("manifest for victim generation 1000 is signed at ", s["detail"])
        self.assertIn(", before generation 1 accepted here, signed at ", s["detail"])
        self.assertIn("a controller is replaying an older manifest", s["detail"])
        self.assertIn("operators must keep their clocks synchronised", s["detail"])
        self.assertEqual(victim.current_system(), fix)
        self.assertEqual(victim.state_json()["lastApplied"], 1)

        # The steered number froze nothing: the next publish (1001) deploys.
        newer = env.build("newer")
        self.assertEqual(env.publish("victim", newer), 1001)
        env.wait_phase("victim", 1001, "succeeded")
        self.assertEqual(victim.current_system(), newer)

    def test_state_reset_does_not_reopen_replay(self):
        env = self.env.start()
        victim = env.add_agent("victim").start()
        victim.wait_connected()
        t1 = env.build("v1")
        t2 = env.build("v2")
        g1 = env.publish("victim", t1)
        env.wait_phase("victim", g1, "succeeded")
        g2 = env.publish("victim", t2)
        env.wait_phase("victim", g2, "succeeded")
        victim.stop()
        with open(os.path.join(victim.state, "floor.json")) as f:
            floor = json.load(f)
        self.assertEqual(floor["lastApplied"], g2)
        self.assertEqual(floor["lastCreatedAt"],
                         json.loads(self.generation_row("victim", g2)["manifest"])["createdAt"])
        self.assertEqual(os.stat(os.path.join(victim.state, "floor.json")).st_mode & 0o777, 0o600)
        # The state is reset (what an operator does with a corrupt state.json) …
        os.rename(os.path.join(victim.state, "state.json"),
                  os.path.join(victim.state, "state.json.aside"))
        # … and the controller offers the validly signed generation 1 as the newest.
        with self.db() as db:
            db.execute("UPDATE generations SET generation=3 WHERE machine='victim' AND generation=?",
                       (g1,))
        victim.start()
        s = env.wait_phase("victim", g1, "refused")
        self.assertIn(f"manifest for victim generation {g1} is not newer than generation {g2} "
                      "already accepted here", s["detail"])
        self.assertEqual(victim.current_system(), t2)
        victim.proc.wait_log(r"replay floor: generation 2, signed at \S+ \(floor\.json; "
                             r"state\.json is absent")
        t3 = env.build("v3")
        g3 = env.publish("victim", t3)
        self.assertEqual(g3, 4)
        env.wait_phase("victim", g3, "succeeded")
        self.assertEqual(victim.current_system(), t3)

    def test_manifest_signed_in_the_future_is_refused(self):
        env = self.env.start()
        victim = env.add_agent("victim", maxManifestFutureSkew=60).start()
        victim.wait_connected()
        t1 = env.build("now")
        g1 = env.publish("victim", t1)
        env.wait_phase("victim", g1, "succeeded")
        # Generation 2 signed by the operator key one hour ahead of the clocks.
        row = self.generation_row("victim", g1)
        m = json.loads(row["manifest"])
        m["generation"] = 2
        m["createdAt"] = int(time.time()) + 3600
        text = json.dumps(m, sort_keys=True, separators=(",", ":"))
        row.update(generation=2, manifest=text,
                   signature=sign_with_operator_key(env.op_key, text, env.root))
        self.insert_row(row)
        victim.stop()  # reconnecting, the agent is offered generation 2
        victim.start()
        s = env.wait_phase("victim", 2, "refused")
        self.assertIn("manifest for victim generation 2 is signed at ", s["detail"])
        self.assertRegex(s["detail"], r"\b3[56]\d\d s ahead of this machine's clock")
        self.assertIn("maxManifestFutureSkew is 60 s", s["detail"])
        self.assertEqual(victim.current_system(), t1)
        self.assertEqual(victim.state_json()["lastApplied"], g1)
        # The refused manifest raised no floor: a publish signed now deploys.
        t3 = env.build("later")
        g3 = env.publish("victim", t3)
        env.wait_phase("victim", g3, "succeeded")
        self.assertEqual(victim.current_system(), t3)


if __name__ == "__main__":
    unittest.main()
