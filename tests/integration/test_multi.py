"""Several controllers at the same time on one PostgreSQL database: fan-out of
publishes and reports between them, presence, one rollout driver with
takeover when a controller is SIGKILLed, and the database restarted under
load. Real binaries, real TLS and keys, real nix, a throw-away PostgreSQL."""
import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import unittest
import urllib.request

import pg
from harness import EnvTest, Process, binary, nix_env, wait_until
from test_webhooks import Receiver


def port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Controller:
    """One muster-controller process of the fleet: its own state directory
    (with the shared key and certificate), a fixed port once started."""

    def __init__(self, env, index, state_dir):
        self.env = env
        self.index = index
        self.dir = state_dir
        self.log = os.path.join(env.root, f"controller-{index}.log")
        self.port = None
        self.metrics_port = None
        self.proc = None
        self.runs = 0

    def start(self):
        rx = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
        mx = re.compile(r"metrics on 127\.0\.0\.1:(\d+)")
        for _ in range(20):
            before = 0
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    before = len(rx.findall(f.read()))
            self.proc = Process([binary("muster-controller"), "run", "--state-dir", self.dir,
                                 "--listen", f"127.0.0.1:{self.port or 0}",
                                 "--metrics-listen", "127.0.0.1:0", *self.env.store_args()],
                                self.log)

            def up():
                found = rx.findall(self.proc.text())
                if len(found) > before:
                    return found[-1]
                if not self.proc.alive():
                    return "exited"
                return None
            got = wait_until(up, 30, what=f"controller {self.index} listening")
            if got != "exited":
                self.port = int(got)
                self.metrics_port = int(mx.findall(self.proc.text())[-1])
                self.runs += 1
                return self
            # The port of a killed predecessor not free yet: wait until it is.
            wait_until(lambda: port_free(self.port), 30, what=f"port {self.port} free")
        raise AssertionError(f"controller {self.index} did not start:\n{self.proc.text()[-3000:]}")

    def kill(self):
        self.proc.kill()

    def stop(self):
        if self.proc:
            self.proc.stop()

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def url(self):
        return f"wss://127.0.0.1:{self.port}"

    def config(self):
        return self.env.write_cli_config(name=f"config-{self.index}.json",
                                         controller=self.url())

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()


class MultiTest(EnvTest):
    def setUp(self):
        super().setUp()
        if pg.bin_dir() is None:
            self.skipTest("PostgreSQL binaries (initdb, pg_ctl) not found; install 'postgresql'")
        self.pg = pg.PgServer().start()
        self.addCleanup(self.pg.close)
        self.db = self.pg.new_database()
        self.ctls = []
        self.addCleanup(self._stop_controllers)

    def _stop_controllers(self):
        for a in self.env.agents.values():
            a.stop()
        for c in self.ctls:
            c.stop()

    def controllers(self, n):
        """n controllers on one database, sharing one key (see docs/POSTGRESQL.md)."""
        env = self.env
        env.store = self.pg.uri(self.db)
        env.init_controller()
        for i in range(n):
            d = env.ctl_dir if i == 0 else os.path.join(env.root, f"controller-{i}")
            if i:
                os.makedirs(d, mode=0o700)
                for f in ("controller.key", "controller.crt"):
                    shutil.copy2(os.path.join(env.ctl_dir, f), os.path.join(d, f))
            self.ctls.append(Controller(env, i, d).start())
        # The harness's own config (env.cli without config=) talks to the first.
        env.port = self.ctls[0].port
        env.write_cli_config()
        return self.ctls

    def agents(self, names, tags=("fleet",)):
        """Agents spread over the controllers: agent i tries controller i % n
        first, then the others in turn."""
        n = len(self.ctls)
        out = []
        for i, name in enumerate(names):
            urls = [self.ctls[(i + k) % n].url() for k in range(n)]
            out.append(self.env.add_agent(name, tags=tags, controllers=urls).start())
        return out

    def cli(self, ctl, *args, check=True, timeout=120):
        return self.env.cli(*args, check=check, timeout=timeout, config=ctl.config())

    def status_all(self, ctl):
        return json.loads(self.cli(ctl, "status", "--json").stdout)

    def connected_to(self, agent):
        """The id of the controller holding the agent's connection ("" if none)."""
        out = self.pg.psql(self.db, f"SELECT controller FROM presence WHERE machine = '{agent}'")
        return out.strip()

    def wait_identical_status(self, ctls, pred=lambda s: True, timeout=30):
        def same():
            views = [self.status_all(c) for c in ctls]
            if all(v == views[0] for v in views) and pred(views[0]):
                return views[0]
            return None
        return wait_until(same, timeout, interval=0.2, what="identical status everywhere")

    # ------------------------------------------------------------------ tests
    def test_two_controllers_publish_through_one_deploys_on_the_other(self):
        a, b = self.controllers(2)
        web1, web2 = self.agents(["web1", "web2"])
        for ag in (web1, web2):
            wait_until(lambda ag=ag: json.loads(
                self.cli(b, "status", ag.name, "--json").stdout)[0]["online"],
                30, what=f"{ag.name} online as seen from b")
        ids = {self.connected_to("web1"), self.connected_to("web2")}
        self.assertEqual(len(ids), 2, "the agents are spread over both controllers")
        # web2 tried b first: publish through a; --wait sees its report via b.
        env = self.env
        top = env.build("multi-a")
        r = self.cli(a, "publish", "web2", top, "--substituter", env.cache.url,
                     "--trusted-public-key", env.cache.public, "--wait", "--timeout", "60")
        self.assertIn("succeeded", r.stdout)
        self.assertEqual(web2.current_system(), top)
        # And the other way round, through b to the agent on a.
        gen = int(re.search(r"generation (\d+)",
                            self.cli(b, "publish", "web1", top, "--substituter", env.cache.url,
                                     "--trusted-public-key", env.cache.public).stdout).group(1))
        env.wait_phase("web1", gen, "succeeded")
        self.assertEqual(web1.current_system(), top)
        view = self.wait_identical_status(
            [a, b], lambda s: all(m["online"] and m["phase"] == "succeeded" for m in s))
        self.assertEqual(sorted(m["name"] for m in view), ["web1", "web2"])
        # Each controller read the other's changes, and says how late.
        for c in (a, b):
            m = re.search(r"^muster_notification_lag_seconds_count (\d+)$", c.metrics(), re.M)
            self.assertIsNotNone(m, "lag histogram exported")
            self.assertGreater(int(m.group(1)), 0)

    def test_a_preview_through_one_controller_reaches_an_agent_on_another(self):
        a, b = self.controllers(2)
        web1, web2 = self.agents(["web1", "web2"])
        wait_until(lambda: self.connected_to("web1") != "" and self.connected_to("web2") != "",
                   30, what="both agents connected")
        self.assertNotEqual(self.connected_to("web1"), self.connected_to("web2"))
        env = self.env
        base = env.build("preview-base")
        cache = ["--substituter", env.cache.url, "--trusted-public-key", env.cache.public]
        self.cli(a, "publish", "web1", "web2", base, *cache, "--wait", "--timeout", "90")
        nxt = env.build("preview-next", restartUnits="sshd.service")
        # web2 is held by b: a passes the signed request on, b's agent answers,
        # and its report comes back to the CLI on a.
        r = self.cli(a, "--json", "publish", "web2", nxt, "--preview", *cache,
                     "--timeout", "90")
        out = json.loads(r.stdout)
        self.assertEqual(out["offline"], [], out)
        self.assertEqual(out["noAnswer"], [], out)
        [one] = out["machines"]
        self.assertEqual(one["machine"], "web2")
        self.assertEqual(one["error"], "", one)
        self.assertEqual(one["toplevel"], nxt)
        self.assertEqual(one["current"], base)
        self.assertEqual(one["units"]["restart"], ["sshd.service"], one)
        # The whole fleet through b: one agent here, one on a.
        r = self.cli(b, "--json", "publish", "--tag", "fleet", nxt, "--preview", *cache,
                     "--timeout", "90")
        out = json.loads(r.stdout)
        self.assertEqual(out["noAnswer"], [], out)
        self.assertEqual(sorted(m["machine"] for m in out["machines"]), ["web1", "web2"])
        for m in out["machines"]:
            self.assertEqual(m["error"], "", m)
        # A preview changes nothing.
        for ag in (web1, web2):
            self.assertEqual(ag.current_system(), base, ag.name)

    def test_the_binary_cache_is_shared_and_outlives_the_controller_it_was_uploaded_to(self):
        a, b = self.controllers(2)
        web1, web2 = self.agents(["web1", "web2"])
        wait_until(lambda: self.connected_to("web1") != "" and self.connected_to("web2") != "",
                   30, what="both agents connected")
        self.assertNotEqual(self.connected_to("web1"), self.connected_to("web2"))
        self.assertIn("binary cache in the PostgreSQL store", a.proc.text())
        env = self.env
        key = os.path.join(env.cli_dir, "cache.key")
        self.cli(a, "key", "generate", "--cache", "--name", "fleet-multi-1", "--out", key)
        # Uploaded through a, fetched by web2 through b: nothing but the
        # controllers' shared cache holds the closure.
        one = env.build("shared-cache-1", push=False, delete=False, payload=1 << 20)
        self.cli(a, "cache", "push", one, "--cache-key", key)
        env.delete_local(one)
        self.assertFalse(os.path.exists(one))
        r = self.cli(a, "publish", "web2", one, "--cache-key", key)
        gen = int(re.search(r"generation (\d+)", r.stdout).group(1))
        s = env.wait_phase("web2", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(web2.current_system(), one)
        # Pushed through a, which then dies: b still has every path (its CLI
        # uploads nothing), and web1, back through b, realises from it.
        two = env.build("shared-cache-2", kernel="6.1.1", push=False, delete=False,
                        payload=1 << 20)
        paths = subprocess.run(["nix-store", "-q", "--requisites", two], capture_output=True,
                               text=True, env=nix_env(), check=True).stdout.split()
        self.cli(a, "cache", "push", two, "--cache-key", key)
        env.delete_local(two)
        for p in paths:
            self.assertFalse(os.path.exists(p), p)
        a.kill()
        env.port = b.port  # the harness's own CLI config now names b
        env.write_cli_config()
        wait_until(lambda: self.connected_to("web1") == self.connected_to("web2"), 60,
                   what="web1 failed over to b")
        st = json.loads(self.cli(b, "cache", "status", "--json").stdout)
        self.assertGreaterEqual(st["paths"], len(paths), st)
        r = self.cli(b, "publish", "web1", two, "--cache-key", key)
        gen = int(re.search(r"generation (\d+)", r.stdout).group(1))
        s = env.wait_phase("web1", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(web1.current_system(), two)
        for p in paths:
            self.assertTrue(os.path.exists(p), p)

    def test_three_controllers_registry_presence_and_events_everywhere(self):
        a, b, c = self.controllers(3)
        agents = self.agents(["n0", "n1", "n2"])
        self.wait_identical_status([a, b, c], lambda s: all(m["online"] for m in s))
        self.assertEqual(len({self.connected_to(x.name) for x in agents}), 3)
        env = self.env
        # A machine registered through c, whose agent knows only b's address.
        late = env.add_agent("late", register=False, controllers=[b.url()])
        self.cli(c, "machine", "add", "late", "--key", late.public_key(), "--tag", "fleet")
        late.start()
        self.wait_identical_status([a, b, c],
                                   lambda s: len(s) == 4 and all(m["online"] for m in s))
        # A rollout over all four through a: every agent, whichever controller
        # holds it, deploys; `rollout watch` through c sees it finish.
        top = env.build("multi-three")
        r = self.cli(a, "publish", "--tag", "fleet", top, "--max-parallel", "2",
                     "--substituter", env.cache.url, "--trusted-public-key", env.cache.public)
        rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
        w = self.cli(c, "rollout", "watch", rid, "--timeout", "90", check=False)
        self.assertEqual(w.returncode, 0, w.stdout + w.stderr)
        self.assertIn(f"rollout {rid} succeeded", w.stdout)
        for ag in agents + [late]:
            self.assertEqual(ag.current_system(), top, ag.name)
        self.wait_identical_status(
            [a, b, c], lambda s: all(m["phase"] == "succeeded" and m["online"] for m in s))
        # Revoked through b: the agent's connection, held by another, closes and
        # every controller shows it offline and revoked.
        holder = self.connected_to("n2")
        self.assertNotEqual(holder, "", "n2 is connected somewhere")
        self.cli(b, "machine", "revoke", "n2")
        agents[2].proc.wait_log(r"closed by the controller: machine key was revoked|connection lost",
                                timeout=10)
        self.wait_identical_status([a, b, c], lambda s: any(
            m["name"] == "n2" and not m["online"] for m in s))
        # Its key is refused everywhere now: it stays offline.
        self.assertEqual(self.pg.psql(self.db, "SELECT COUNT(*) FROM presence WHERE machine = 'n2'"),
                         "0\n")

    def test_sigkill_during_rollouts_loses_nothing_and_releases_once(self):
        ctls = self.controllers(2)
        names = ["k0", "k1", "k2"]
        agents = self.agents(names)
        env = self.env
        self.wait_identical_status(ctls, lambda s: all(m["online"] for m in s))
        tops = [env.build("kill-a"), env.build("kill-b")]
        rng = random.Random(int(os.environ.get("MUSTER_TEST_SEED", "1313")))
        expected = {n: 0 for n in names}
        rounds = int(os.environ.get("MUSTER_KILL_ROUNDS", "20"))
        for i in range(rounds):
            top = tops[i % 2]
            via = rng.choice(ctls)
            r = self.cli(via, "publish", "--tag", "fleet", top, "--max-parallel",
                         str(rng.choice([1, 2])), "--substituter", env.cache.url,
                         "--trusted-public-key", env.cache.public)
            rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
            for n in names:
                expected[n] += 1
            # Kill a controller at a random moment of the rollout: as soon as a
            # random number of machines have reported anything after it began.
            victim = rng.choice(ctls)
            after = rng.randint(0, len(names))
            survivor = ctls[1 - ctls.index(victim)]

            def progressed():
                items = json.loads(self.cli(survivor, "rollout", "status", rid,
                                            "--json").stdout)["items"]
                return sum(it["state"] != "pending" for it in items) >= after
            wait_until(progressed, 60, interval=0.05, what=f"round {i}: {after} released")
            victim.kill()
            victim.start()
            def done():
                st = json.loads(self.cli(survivor, "rollout", "status", rid, "--json").stdout)
                return st if st["state"] not in ("running", "paused") else None
            try:
                st = wait_until(done, 90, interval=0.2, what=f"round {i}: rollout {rid} finished")
            except AssertionError:
                env.dump_logs()
                raise
            self.assertEqual(st["state"], "succeeded", f"round {i}: {st['detail']}")
            self.assertEqual(sorted(it["state"] for it in st["items"]), ["succeeded"] * len(names))
            for n in names:
                s = json.loads(self.cli(survivor, "status", n, "--json").stdout)[0]
                self.assertEqual((s["generation"], s["phase"]), (expected[n], "succeeded"),
                                 f"round {i}: {n}")
        for ag in agents:
            self.assertEqual(ag.current_system(), tops[(rounds - 1) % 2])
        # No generation lost or duplicated: each machine holds 1..rounds, each
        # released exactly once.
        for n in names:
            gens = self.pg.psql(self.db, f"SELECT string_agg(generation::TEXT, ',' ORDER BY "
                                         f"generation) FROM generations WHERE machine = '{n}' "
                                         f"AND released = 1").strip()
            self.assertEqual(gens, ",".join(str(g) for g in range(1, rounds + 1)), n)
        twice = self.pg.psql(self.db, "SELECT subject, generation, COUNT(*) FROM changes WHERE "
                                      "kind = 'deploy' GROUP BY subject, generation HAVING "
                                      "COUNT(*) > 1")
        self.assertEqual(twice, "", "a machine released twice")
        released = self.pg.psql(self.db, "SELECT COUNT(*) FROM changes WHERE kind = 'deploy'")
        self.assertEqual(int(released), rounds * len(names))
        self.assertEqual(sum(c.runs for c in ctls), rounds + 2, "a kill every round")

    def test_webhooks_are_sent_once_and_by_another_controller_after_a_sigkill(self):
        """One queue in the database: each notification is sent by one
        controller; one whose sender was SIGKILLed mid-POST is sent by the
        other once the dead one's lease expires (at-least-once: the receiver
        may have had the first attempt)."""
        a, b = self.controllers(2)
        rx = Receiver()
        self.addCleanup(rx.close)
        # Added through b; a's sender sees it at its next poll (every second):
        # wait out two polls, or a deploy that ends on a's agent before that
        # is not notified to it (docs/POSTGRESQL.md).
        hook = json.loads(self.cli(b, "webhook", "add", rx.url, "--event", "deploy",
                                   "--json").stdout)["id"]
        time.sleep(2.0)
        self.assertIn(hook, self.cli(a, "webhook", "list").stdout, "one set of webhooks")
        web1, web2 = self.agents(["web1", "web2"])
        for ag in (web1, web2):
            wait_until(lambda ag=ag: self.env.status(ag.name)["online"], 30,
                       what=f"{ag.name} online")
        env = self.env
        first = {}
        for ag in (web1, web2):
            first[ag.name] = env.publish(ag.name, env.build(f"hook-{ag.name}"))
        for name, gen in first.items():
            env.wait_phase(name, gen, "succeeded")

        def deliveries(name, gen):
            return rx.delivered("deploy", lambda d: d["data"]["machine"] == name and
                                d["data"]["generation"] == gen)
        for name, gen in first.items():
            wait_until(lambda n=name, g=gen: deliveries(n, g), 30, what=f"{name} notified")

        # The receiver now holds the next POST unanswered; kill the controller
        # sending it (its id, "<host>-<pid>-<random>", names the process).
        held = threading.Event()
        release = threading.Event()
        held_body = []
        orig = rx.server.RequestHandlerClass.do_POST

        def holding(handler):
            if held.is_set():
                return orig(handler)
            # Read, never answered (nor recorded): its sender dies meanwhile.
            held_body.append(json.loads(handler.rfile.read(
                int(handler.headers.get("Content-Length", "0")))))
            held.set()
            release.wait(60)
            handler.close_connection = True
        rx.server.RequestHandlerClass.do_POST = holding
        second = {}
        for ag in (web1, web2):
            second[ag.name] = env.publish(ag.name, env.build(f"hook2-{ag.name}"))
        wait_until(held.is_set, 60, what="a POST held at the receiver")
        for name, gen in second.items():
            env.wait_phase(name, gen, "succeeded")  # and so queued where it was reported
        claimed = self.pg.psql(self.db, "SELECT DISTINCT claimed_by FROM deliveries WHERE "
                                        "claimed_by <> ''").split()
        self.assertTrue(claimed, "the held delivery is claimed")
        pid = int(claimed[0].rsplit("-", 2)[1])
        victim = next(c for c in (a, b) if c.proc.proc.pid == pid)
        survivor = b if victim is a else a
        victim.kill()
        release.set()
        for name, gen in second.items():
            wait_until(lambda n=name, g=gen: deliveries(n, g), 60,
                       what=f"{name} generation {gen} notified")
        self.assertIn(held_body[0]["id"], [d["id"] for d in rx.delivered("deploy")],
                      "the notification whose sender died was sent by the other")
        wait_until(lambda: "0 deliveries queued" in self.cli(survivor, "webhook", "list").stdout,
                   30, what="queue drained")
        for name, gen in first.items():
            self.assertEqual(len(deliveries(name, gen)), 1, f"{name} {gen}: sent once")
        for name, gen in second.items():
            ids = {d["id"] for d in deliveries(name, gen)}
            self.assertEqual(len(ids), 1, f"{name} {gen}: one notification (maybe sent twice)")

    def test_logs_follow_on_one_controller_shows_an_agent_on_another(self):
        a, b = self.controllers(2)
        (web1,) = self.agents(["web1"])
        wait_until(lambda: self.env.status("web1")["online"], 30, what="web1 online")
        self.assertEqual(self.connected_to("web1"),
                         self.pg.psql(self.db, "SELECT id FROM controllers ORDER BY started_at "
                                               "LIMIT 1").strip(), "web1 is on a")
        follow = subprocess.Popen([binary("muster"), "--config", b.config(), "logs", "web1", "-f"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=self.env.cli_env())
        self.addCleanup(lambda: (follow.kill(), follow.wait(), follow.stdout.close()))
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(follow.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        env = self.env
        gen = env.publish("web1", env.build("follow-across"))
        env.wait_phase("web1", gen, "succeeded")
        wait_until(lambda: any("activating follow-across" in l for l in list(lines)), 30,
                   what="the activation's log line followed through b")

    def test_database_restart_under_load(self):
        a, b = self.controllers(2)
        names = ["d0", "d1", "d2", "d3"]
        agents = self.agents(names)
        env = self.env
        self.wait_identical_status([a, b], lambda s: all(m["online"] for m in s))
        tops = [env.build("db-a"), env.build("db-b")]
        accepted = {n: [] for n in names}
        refused = []
        stop = threading.Event()
        lock = threading.Lock()

        def publisher(k):
            i = 0
            while not stop.is_set():
                n = names[(k + 2 * i) % len(names)]
                ctl = (a, b)[i % 2]
                r = self.cli(ctl, "publish", n, tops[(i // 2) % 2], "--substituter", env.cache.url,
                             "--trusted-public-key", env.cache.public, check=False, timeout=60)
                with lock:
                    if r.returncode == 0:
                        accepted[n].append(int(re.search(r"generation (\d+)", r.stdout).group(1)))
                    else:
                        refused.append(r.stderr + r.stdout)
                i += 1
        threads = [threading.Thread(target=publisher, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sum(len(v) for v in accepted.values()) >= 6, 60,
                       what="publishes before the outage")
            agent_logs = {ag.name: ag.proc.text() for ag in agents}
            self.pg.stop()
            n_refused = len(refused)
            wait_until(lambda: len(refused) >= n_refused + 2, 60,
                       what="publishes refused while the database is down")
            with lock:
                for text in refused[n_refused:]:
                    self.assertIn("PostgreSQL store unreachable", text)
            self.assertTrue(a.alive() and b.alive())
            self.pg.start()
            wait_until(lambda: "database reachable again" in a.proc.text() and
                       "database reachable again" in b.proc.text(), 60,
                       what="both controllers back on the database")
            before = sum(len(v) for v in accepted.values())
            wait_until(lambda: sum(len(v) for v in accepted.values()) >= before + 6, 60,
                       what="publishes after the outage")
        finally:
            stop.set()
            for t in threads:
                t.join()
        # Nothing lost: every machine ends on its last accepted generation, and
        # every accepted number is in its history once.
        for n in names:
            self.assertTrue(accepted[n], n)
            env.wait_phase(n, max(accepted[n]), {"succeeded", "unchanged"}, timeout=90)
            stored = self.pg.psql(self.db, f"SELECT generation FROM generations WHERE machine = "
                                           f"'{n}'").split()
            stored = [int(x) for x in stored]
            self.assertEqual(len(stored), len(set(stored)))
            self.assertTrue(set(accepted[n]) <= set(stored), n)
        # Agents kept their connections: no new hello at either controller, no
        # reconnect in any agent's log.
        for c in (a, b):
            self.assertTrue(c.alive())
        for ag in agents:
            text = ag.proc.text()
            self.assertEqual(text.count("connected to the controller"),
                             agent_logs[ag.name].count("connected to the controller"),
                             f"{ag.name} reconnected")
        self.wait_identical_status([a, b], lambda s: all(m["online"] for m in s))


if __name__ == "__main__":
    unittest.main()
