"""No input from one machine hurts the others: a registered machine floods the
controller with log lines, status reports and events, for generations that
exist and many that do not, while a second machine deploys. The deploy
completes, the flooder's rows in the store stay under their bounds, and the
controller stays healthy."""
import json
import os
import random
import re
import sqlite3
import sys
import threading
import time
import unittest
import urllib.request

from harness import EnvTest, wait_until
from rawclient import Identity, WsConn

# Small bounds so that the flood reaches them within seconds.
LOG_BYTES_PER_MACHINE = 256 << 10
LOG_BYTES_PER_GENERATION = 64 << 10
EVENTS_PER_MACHINE = 200
ROW_OVERHEAD = 64  # StoreLimits::kLogRowOverhead
FLOOD_TOPLEVEL = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-flood"
PHASES = ["realising", "vars-installed", "activating", "confirming", "succeeded", "failed"]


def note(msg):
    sys.stderr.write(f"\n    [{msg}] ")


def frame(kind, body):
    return json.dumps({"v": 1, "type": kind, "body": body})


class Flooder(threading.Thread):
    """Sends as fast as TCP lets it, reconnecting when the controller closes."""

    def __init__(self, port, ident, existing, max_generation):
        super().__init__(daemon=True)
        self.port = port
        self.identity = ident
        self.existing = existing
        self.max_generation = max_generation
        self.stop = threading.Event()
        self.sent = {"log": 0, "status": 0, "bytes": 0}
        self.sessions = 0
        self.errors = []

    def run(self):
        rng = random.Random(7)
        line = "x" * 500
        while not self.stop.is_set():
            c = None
            try:
                c = WsConn(self.port, self.identity, timeout=30)
                self.sessions += 1
                c.send_frame(frame("hello", {"machine": "flood", "agentVersion": "flood",
                                             "phase": "idle"}))
                seq = 0
                while not self.stop.is_set():
                    # Every other message names a generation that does not exist.
                    gen = (rng.randint(1, self.existing) if seq % 2 else
                           rng.randint(self.existing + 1, self.max_generation))
                    text = frame("log", {"generation": gen, "stream": "realise",
                                         "lines": [f"{gen}:{i}:{line}" for i in range(100)]})
                    c.send_frame(text)
                    self.sent["log"] += 1
                    self.sent["bytes"] += len(text)
                    seq += 1
                    text = frame("status", {"seq": seq, "generation": gen,
                                            "phase": rng.choice(PHASES), "detail": "y" * 1000})
                    c.send_frame(text)
                    self.sent["status"] += 1
                    self.sent["bytes"] += len(text)
            except (OSError, ConnectionError) as e:
                self.errors.append(repr(e))
            finally:
                if c:
                    c.close()


class FloodTest(EnvTest):
    def metrics(self, port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        values = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def test_a_flooding_machine_does_not_stop_another_from_deploying(self):
        env = self.env
        env.init_controller()
        env.start_controller(extra=[
            "--metrics-listen", "127.0.0.1:0",
            "--max-log-bytes-per-machine", str(LOG_BYTES_PER_MACHINE),
            "--max-log-bytes-per-generation", str(LOG_BYTES_PER_GENERATION),
            "--max-events-per-machine", str(EVENTS_PER_MACHINE),
            "--keep-event-generations", "2"])
        mport = int(env.controller.wait_log(r"metrics on 127\.0\.0\.1:(\d+)").group(1))
        good = env.add_agent("good").start()
        good.wait_connected()
        first = env.publish("good", env.build("good-a"))
        env.wait_phase("good", first, "succeeded")

        ident = Identity(env.root, "flood")
        env.cli("machine", "add", "flood", "--key", ident.public)
        for _ in range(3):  # generations 1..3 exist for the flooder; 4..60 do not
            env.publish("flood", FLOOD_TOPLEVEL)
        second_top = env.build("good-b")
        flood = Flooder(env.port, ident, existing=3, max_generation=60)
        flood.start()
        self.addCleanup(flood.stop.set)

        # Meanwhile the other machine still deploys, start to finish.
        started = time.monotonic()
        second = env.publish("good", second_top)
        s = env.wait_phase("good", second, ["succeeded", "failed", "rolled-back"], timeout=300)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        note(f"the other machine's deploy took {time.monotonic() - started:.1f} s during the flood")
        self.assertEqual(good.current_system(), second_top)
        # The flood goes on until it has crossed every bound several times over.
        lines_per_bound = LOG_BYTES_PER_MACHINE // (500 + ROW_OVERHEAD)

        def flooded():
            m = self.metrics(mport)
            return (m["muster_agent_read_pauses_total"] > 0 and
                    m['muster_log_lines_dropped_total{reason="unknown-generation"}'] > 0 and
                    m["muster_log_lines_stored_total"] > 4 * lines_per_bound and
                    m["muster_status_reports_total"] > 2 * EVENTS_PER_MACHINE) and m
        m = wait_until(flooded, 180, interval=0.5, what="the flood past every bound")
        self.assertTrue(flood.is_alive(), flood.errors)
        flood.stop.set()
        flood.join(30)
        self.assertFalse(flood.is_alive())
        self.assertGreater(flood.sent["log"], 0)
        note(f"flooder sent {flood.sent['log']} log and {flood.sent['status']} status messages, "
             f"{flood.sent['bytes'] >> 20} MiB, in {flood.sessions} session(s)")

        # The store holds no more for the flooder than its bounds allow.
        db = sqlite3.connect(f"file:{os.path.join(env.ctl_dir, 'muster.db')}?mode=ro", uri=True)
        try:
            log_bytes, log_rows = db.execute(
                "SELECT COALESCE(SUM(LENGTH(CAST(line AS BLOB)) + ?), 0), COUNT(*) FROM logs "
                "WHERE machine = 'flood'", (ROW_OVERHEAD,)).fetchone()
            self.assertGreater(log_rows, 0, "lines for existing generations are kept")
            self.assertLessEqual(log_bytes, LOG_BYTES_PER_MACHINE)
            for gen, n in db.execute("SELECT generation, SUM(LENGTH(CAST(line AS BLOB)) + ?) "
                                     "FROM logs WHERE machine = 'flood' GROUP BY generation",
                                     (ROW_OVERHEAD,)):
                self.assertLessEqual(n, LOG_BYTES_PER_GENERATION, f"generation {gen}")
            unknown = db.execute(
                "SELECT COUNT(*) FROM logs WHERE machine = 'flood' AND generation NOT IN "
                "(SELECT generation FROM generations WHERE machine = 'flood')").fetchone()[0]
            self.assertEqual(unknown, 0, "no lines for generations that do not exist")
            events = db.execute("SELECT COUNT(*) FROM events WHERE machine = 'flood'").fetchone()[0]
            self.assertGreater(events, 0)
            self.assertLessEqual(events, EVENTS_PER_MACHINE)
            good_events = [r[0] for r in db.execute(
                "SELECT phase FROM events WHERE machine = 'good' AND generation = ? ORDER BY id",
                (second,))]
            self.assertIn("succeeded", good_events, "the other machine's events are intact")
        finally:
            db.close()
        note(f"flooder's rows: {log_rows} log lines ({log_bytes >> 10} KiB), {events} events")

        # Healthy: serving, and one warning per flooding session, not one per line.
        self.assertTrue(env.controller.alive())
        health = urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=10).read()
        self.assertEqual(health, b"ok\n")
        self.assertEqual(env.status("good")["phase"], "succeeded")
        log = env.controller.text()
        warnings = len(re.findall(r"\(flood\): dropping log lines for generation", log))
        self.assertGreaterEqual(warnings, 1)
        self.assertLessEqual(warnings, flood.sessions)
        unknown_key = 'muster_log_lines_dropped_total{reason="unknown-generation"}'
        full_key = 'muster_log_lines_dropped_total{reason="queue-full"}'
        note(f"dropped lines: unknown generation {m[unknown_key]:.0f}, queue full "
             f"{m[full_key]:.0f}; read pauses {m['muster_agent_read_pauses_total']:.0f}")


if __name__ == "__main__":
    unittest.main()
