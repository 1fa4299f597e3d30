"""The controller on a PostgreSQL store: deploys, restarts on another host's
state directory, /healthz following the database, and the SQLite copy."""
import os
import re
import shutil
import subprocess
import unittest
import urllib.error
import urllib.request

import pg
from harness import EnvTest, binary, wait_until


class PostgresTest(EnvTest):
    def setUp(self):
        super().setUp()
        if pg.bin_dir() is None:
            self.skipTest("PostgreSQL binaries (initdb, pg_ctl) not found; install 'postgresql'")
        self.pg = pg.PgServer().start()
        self.addCleanup(self.pg.close)
        self.db = self.pg.new_database()

    def healthz(self, port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def test_deploy_and_healthz_follow_the_database(self):
        env = self.env
        env.store = self.pg.uri(self.db)
        env.init_controller()
        env.start_controller(["--metrics-listen", "127.0.0.1:0"])
        port = wait_until(lambda: (lambda m: m and m.group(1))(
            re.search(r"metrics on 127\.0\.0\.1:(\d+)", env.controller.text())), 30,
            what="metrics port")
        self.assertEqual(self.healthz(port), (200, "ok\n"))
        a = env.add_agent("web1", tags=["web"]).start()
        a.wait_connected()
        gen = env.publish("web1", env.build("web1-a"))
        env.wait_phase("web1", gen, "succeeded")
        self.assertEqual(a.current_system(), env.build("web1-a"))
        # The rows are in PostgreSQL, not in a local file.
        self.assertFalse(os.path.exists(os.path.join(env.ctl_dir, "muster.db")))
        self.assertEqual(self.pg.psql(self.db, "SELECT phase FROM machines WHERE name = 'web1'"),
                         "succeeded\n")

        top_b = env.build("web1-b")
        self.pg.stop()
        code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
            self.healthz(port)), 30, what="/healthz reporting the database down")
        self.assertIn("PostgreSQL store unreachable", body)
        r = env.publish("web1", top_b, check=False)
        self.assertNotEqual(r.returncode, 0, "a publish fails while the database is down")
        self.assertIn("PostgreSQL store unreachable", r.stderr + r.stdout)
        st = env.cli("status", check=False)
        self.assertNotEqual(st.returncode, 0, "no empty fleet shown while the database is down")
        self.assertIn("PostgreSQL store unreachable", st.stderr + st.stdout)
        self.assertTrue(env.controller.alive())
        self.assertNotIn("was removed from the store", env.controller.text(),
                         "a database outage removes no operator")

        self.pg.start()
        wait_until(lambda: self.healthz(port)[0] == 200, 30, what="/healthz ok again")
        gen2 = env.publish("web1", top_b)
        self.assertGreater(gen2, gen)
        env.wait_phase("web1", gen2, "succeeded")

    def test_another_controller_on_the_same_database_serves_the_fleet(self):
        env = self.env
        env.store = self.pg.uri(self.db)
        env.start()
        a = env.add_agent("web1").start()
        a.wait_connected()
        gen = env.publish("web1", env.build("web1-a"))
        env.wait_phase("web1", gen, "succeeded")
        before = env.status("web1")
        env.controller.stop()
        # A second host: its own state directory with the shared controller
        # key and certificate (agents pin one key), the same database.
        other = os.path.join(env.root, "controller-2")
        os.makedirs(other, mode=0o700)
        for f in ("controller.key", "controller.crt"):
            shutil.copy2(os.path.join(env.ctl_dir, f), os.path.join(other, f))
        env.ctl_dir = other
        env.start_controller(port=env.port)
        a.wait_connected()
        after = env.status("web1")
        for k in ("generation", "phase", "toplevel"):
            self.assertEqual(after[k], before[k], k)
        gen2 = env.publish("web1", env.build("web1-b"))
        self.assertEqual(gen2, gen + 1, "numbering continues from the shared store")
        env.wait_phase("web1", gen2, "succeeded")

    def test_migrate_copies_an_sqlite_store(self):
        env = self.env.start()  # SQLite
        a = env.add_agent("web1").start()
        a.wait_connected()
        gen = env.publish("web1", env.build("web1-a"))
        env.wait_phase("web1", gen, "succeeded")
        env.controller.stop()
        uri = self.pg.uri(self.db)
        r = subprocess.run([binary("muster-controller"), "migrate", "--store", uri, "--from-sqlite",
                            os.path.join(env.ctl_dir, "muster.db")], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 machines", r.stdout)
        again = subprocess.run([binary("muster-controller"), "migrate", "--store", uri,
                                "--from-sqlite", os.path.join(env.ctl_dir, "muster.db")],
                               capture_output=True, text=True, timeout=120)
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("empty database only", again.stderr)
        plain = subprocess.run([binary("muster-controller"), "migrate", "--store", uri],
                               capture_output=True, text=True, timeout=120)
        self.assertEqual(plain.returncode, 0, plain.stderr)
        self.assertIn("version 5", plain.stdout)
        env.store = uri
        env.start_controller(port=env.port)
        a.wait_connected()
        s = env.status("web1")
        self.assertEqual(s["generation"], gen)
        self.assertEqual(s["phase"], "succeeded")
        gen2 = env.publish("web1", env.build("web1-b"))
        self.assertEqual(gen2, gen + 1)
        env.wait_phase("web1", gen2, "succeeded")


if __name__ == "__main__":
    unittest.main()
