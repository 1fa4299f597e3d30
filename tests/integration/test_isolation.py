"""No input from one machine hurts the others: ill-formed UTF-8 and strings cut
inside a character (reports, logs, facts, process output), a deploy larger
than agents accept, and descriptors that activation must not inherit."""
import json
import os
import re
import struct
import subprocess
import time
import unittest

from harness import EnvTest, binary, nix_env, wait_until
from rawclient import Identity, WsConn

# The controller's cuts (controller/fleet.h, Fleet::kMax…Bytes) and the agent's
# (agent/agent.cc, kMaxLogLineBytes).
DETAIL_LIMIT = 4096
LINE_LIMIT = 8192
FACT_LIMIT = 256
AGENT_LINE_LIMIT = 4000
CHARS = ["\u00e9", "\u20ac", "\U0001F600"]  # 2, 3 and 4 bytes in UTF-8


def across(limit):
    """Strings of every byte length from limit-4 to limit+4 made of ASCII
    padding and one multi-byte character repeated: a cut at `limit` falls on
    every byte position of a 2-, 3- and 4-byte character."""
    out = []
    for ch in CHARS:
        width = len(ch.encode())
        for total in range(limit - 4, limit + 5):
            n = total // width
            out.append("x" * (total - n * width) + ch * n)
    return out


def cut(s, limit):
    """The longest prefix of s that fits `limit` bytes (what the controller keeps)."""
    return s.encode()[:limit].decode("utf-8", errors="ignore")


def strict(data):
    """Decodes bytes as UTF-8, failing the test on any ill-formed sequence."""
    return data.decode("utf-8", errors="strict")


class RawMachine:
    """A registered machine key speaking the real protocol, byte by byte."""

    def __init__(self, env, name):
        self.env = env
        self.name = name
        self.ident = Identity(env.root, name)
        env.cli("machine", "add", name, "--key", self.ident.public)
        self.conn = None
        self.seq = 0
        self.facts = {}

    def hello(self, facts):
        return {"v": 1, "type": "hello",
                "body": {"machine": self.name, "agentVersion": "raw", "facts": facts,
                         "generation": 0, "phase": "idle", "lastApplied": 0}}

    def connect(self, facts):
        self.facts = facts
        self.conn = WsConn(self.env.port, self.ident)
        self.send(self.hello(facts))
        self.expect("welcome")

    def send(self, msg):
        self.conn.send_frame(json.dumps(msg, ensure_ascii=False).encode())

    def expect(self, type_, pred=lambda body: True):
        """Reads frames (skipping deploys and control frames) until a message of type_."""
        for _ in range(100):
            op, data = self.conn.recv_frame()
            if op == 0x8:
                raise AssertionError(f"closed while waiting for {type_}: {data[2:]!r}")
            if op != 0x1:
                continue
            m = json.loads(strict(data))
            if m["type"] == type_ and pred(m["body"]):
                return m["body"]
            if m["type"] == "error":
                raise AssertionError(f"error while waiting for {type_}: {m['body']}")
        raise AssertionError(f"no {type_} message")

    def status(self, generation, phase, detail, **extra):
        self.seq += 1
        seq = self.seq
        self.send({"v": 1, "type": "status",
                   "body": {"seq": seq, "generation": generation, "phase": phase, "detail": detail,
                            **extra}})
        self.expect("ack", lambda b: b["seq"] == seq)

    def logs(self, generation, lines):
        self.send({"v": 1, "type": "log",
                   "body": {"generation": generation, "stream": "activate", "lines": lines}})

    def refused(self, payload):
        """Sends one frame on a fresh connection (after a good hello); returns
        the close code and the error message the controller sent before it."""
        c = WsConn(self.env.port, self.ident)
        try:
            c.send_frame(json.dumps(self.hello(self.facts), ensure_ascii=False).encode())
            c.send_frame(payload)
            error = None
            for _ in range(20):
                op, data = c.recv_frame()
                if op == 0x1:
                    m = json.loads(strict(data))
                    if m["type"] == "error":
                        error = m["body"]["message"]
                elif op == 0x8:
                    return struct.unpack(">H", data[:2])[0], error
            raise AssertionError("the controller did not close the connection")
        finally:
            c.close()


class IsolationTest(EnvTest):
    def cli_text(self, *args):
        """Runs the CLI; its output must be valid UTF-8."""
        env = self.env
        r = subprocess.run([binary("muster"), "--config", os.path.join(env.cli_dir, "config.json"),
                            *args], capture_output=True, timeout=120, env=nix_env())
        self.assertEqual(r.returncode, 0, f"muster {' '.join(args)}: {r.stderr!r}")
        strict(r.stderr)
        return strict(r.stdout)

    def good_env(self):
        env = self.env.start()
        good = env.add_agent("good").start()
        good.wait_connected()
        self.good_top = env.build("good")
        gen = env.publish("good", self.good_top)
        env.wait_phase("good", gen, "succeeded")
        return env, good

    def assert_good_machine_deploys(self):
        env = self.env
        wait_until(lambda: env.status("good")["online"], 30, what="good online")
        gen = env.publish("good", self.good_top, "--force")
        env.wait_phase("good", gen, "succeeded")

    def test_ill_formed_and_cut_utf8_from_a_machine_never_stops_the_controller(self):
        env, good = self.good_env()
        raw = RawMachine(env, "raw")
        gen = env.publish("raw", self.good_top)
        follow = subprocess.Popen([binary("muster"), "--config", os.path.join(env.cli_dir, "config.json"),
                                   "logs", "raw", "-f"], stdout=subprocess.PIPE, env=nix_env())
        self.addCleanup(lambda: (follow.kill(), follow.wait(), follow.stdout.close()))

        facts = {"system": "x86_64-linux", "os": "nixos",
                 "hostname": across(FACT_LIMIT)[2], "osVersion": across(FACT_LIMIT)[13],
                 "kernel": across(FACT_LIMIT)[22]}
        raw.connect(facts)
        details = across(DETAIL_LIMIT) + ["nul \u0000 and controls \u0001\u001f", "\ufffd as sent"]
        for d in details:
            raw.status(gen, "realising", d, facts=facts, toplevel="/nix/store/x-" + "\u20ac" * 400)
        lines = across(LINE_LIMIT) + ["marker-1"]
        raw.logs(gen, lines)
        raw.status(gen, "activating", "after the logs")  # acked: the logs before it are stored

        # Ill-formed input on the wire is refused with a reason, per connection.
        invalid_bytes = ('{"v":1,"type":"status","body":{"seq":9,"generation":1,"phase":"failed",'
                         '"detail":"').encode() + b"cut \xe2\x82" + b'"}}'
        refusals = {
            "raw bytes": raw.refused(invalid_bytes),
            "lone surrogate escape": raw.refused(
                '{"v":1,"type":"log","body":{"generation":1,"stream":"x","lines":["\\ud800"]}}'),
            "surrogate in facts": raw.refused(json.dumps(
                {"v": 1, "type": "status", "body": {"seq": 10, "generation": 1, "phase": "failed",
                                                    "facts": {"hostname": "h"}}})
                .replace('"h"', '"\\udfff"').encode()),
        }
        # Beast refuses ill-formed UTF-8 in a text frame itself (1007); JSON
        # escapes that decode to no character are refused by the parser.
        self.assertEqual(refusals["raw bytes"], (1007, None))
        for what in ("lone surrogate escape", "surrogate in facts"):
            code, error = refusals[what]
            self.assertEqual(code, 1008, what)
            self.assertIn("malformed JSON", error, what)
        self.assertTrue(env.controller.alive())

        def check_reads():
            s = json.loads(self.cli_text("status", "raw", "--json"))[0]
            self.assertEqual(s["detail"], "after the logs")
            for k, v in facts.items():
                self.assertEqual(s["facts"][k], cut(v, FACT_LIMIT), k)
            self.assertLessEqual(len(s["toplevel"].encode()), 1024)
            self.assertIn("raw", self.cli_text("status"))
            self.cli_text("history", "raw")
            hist = json.loads(self.cli_text("history", "raw", "--json"))
            got = [e["detail"] for e in hist[0]["events"] if e["phase"] == "realising"]
            self.assertEqual(got, [cut(d, DETAIL_LIMIT) for d in details])
            self.cli_text("logs", "raw")
            stored = [json.loads(l)["line"] for l in self.cli_text("logs", "raw", "--json").splitlines()]
            self.assertEqual(stored, [cut(l, LINE_LIMIT) for l in lines])

        check_reads()
        # The follower (subscribed before any of this) saw the events and read the lines.
        seen = b""
        os.set_blocking(follow.stdout.fileno(), False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and b"marker-1" not in seen:
            chunk = follow.stdout.read()
            if chunk:
                seen += chunk
            else:
                time.sleep(0.05)
        self.assertIn("marker-1", strict(seen))
        self.assertIsNone(follow.poll(), "logs -f is still following")

        raw.conn.close()
        env.controller.stop()
        env.start_controller(port=env.port)
        check_reads()
        self.assertNotIn("terminate", env.controller.text())
        self.assert_good_machine_deploys()

    def test_agent_survives_ill_formed_and_long_process_output(self):
        env = self.env.start()
        a = env.add_agent("noisy").start()
        a.wait_connected()
        gen = env.publish("noisy", env.build("garbage", behaviour="garbage"))
        s = env.wait_phase("noisy", gen, {"failed", "rolled-back"})
        self.assertTrue(a.proc.alive(), "the agent is still running")
        self.assertIn("stderr ends \ufffd", s["detail"])
        self.assertLessEqual(len(s["detail"].encode()), DETAIL_LIMIT)
        out = wait_until(lambda: (lambda o: o if "bad bytes" in o else None)(
            self.cli_text("logs", "noisy", "--json")), 15, what="activation output in logs")
        lines = [json.loads(l)["line"] for l in out.splitlines()]
        self.assertIn("bad bytes: \ufffd\ufffd \ufffd\ufffd \ufffd\ufffd\ufffd cut: \ufffd", lines)
        self.assertIn(cut("\u20ac" * 1500, AGENT_LINE_LIMIT), lines)
        # Its state is readable after a restart, and the next generation deploys.
        a.stop()
        a.start()
        a.wait_connected()
        gen2 = env.publish("noisy", env.build("quiet"))
        env.wait_phase("noisy", gen2, "succeeded")

    def test_publish_larger_than_agents_accept_is_refused_at_publish(self):
        env, good = self.good_env()
        big = os.path.join(env.root, "bigvars")
        os.makedirs(big)
        with open(os.path.join(big, "blob"), "wb") as f:
            f.write(os.urandom(700 * 1024))
        r = env.publish("good", self.good_top, "--vars", big, "--force", check=False)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertRegex(r.stderr, r"deploy message for good generation 2 would be \d+ bytes, more "
                                   r"than the 1048576 bytes agents accept")
        self.assertIn("make the vars smaller", r.stderr)
        self.assertEqual(env.status("good")["targetGeneration"], 1, "nothing was stored")
        small = os.path.join(env.root, "smallvars")
        os.makedirs(small)
        with open(os.path.join(small, "key.txt"), "w") as f:
            f.write("AGE-SECRET-KEY-1\n")
        gen = env.publish("good", self.good_top, "--vars", small, "--force")
        env.wait_phase("good", gen, "succeeded")
        self.assertNotIn("larger than", good.proc.text())

    def test_agent_logs_a_message_larger_than_it_accepts(self):
        # An agent whose limit is below the controller's: the deploy is refused
        # by the agent with a clear error, not a silent reconnect loop.
        env = self.env.start()
        a = env.add_agent("tight", maxMessageBytes=65536).start()
        a.wait_connected()
        vdir = os.path.join(env.root, "vars")
        os.makedirs(vdir)
        with open(os.path.join(vdir, "blob"), "wb") as f:
            f.write(os.urandom(100 * 1024))
        env.publish("tight", env.build("t1"), "--vars", vdir)
        a.proc.wait_log(r"error.*the controller sent a message larger than maxMessageBytes "
                        r"\(65536 bytes\).*at least the controller's --max-message-bytes")
        self.assertTrue(a.proc.alive())

    def test_activation_inherits_no_descriptors(self):
        env = self.env.start()
        a = env.add_agent("fds", metricsListen="127.0.0.1:0").start()
        a.wait_connected()
        a.proc.wait_log(r"metrics on 127\.0\.0\.1:\d+")
        # The agent holds its TLS connection and the metrics listener.
        fd_dir = f"/proc/{a.proc.proc.pid}/fd"
        sockets = [n for n in os.listdir(fd_dir) if os.readlink(os.path.join(fd_dir, n)).startswith("socket:")]
        self.assertGreaterEqual(len(sockets), 2)
        gen = env.publish("fds", env.build("fds", behaviour="fds"))
        env.wait_phase("fds", gen, "succeeded")
        with open(os.path.join(env.root, "activation.log.fds")) as f:
            listing = f.read()
        fds = {}
        for line in listing.splitlines():
            m = re.search(r" (\d+) -> (.*)$", line)
            if m and not re.fullmatch(r"/proc/\d+/fd", m.group(2)):  # ls's own directory
                fds[int(m.group(1))] = m.group(2)
        self.assertEqual(sorted(fds), [0, 1, 2], listing)
        self.assertTrue(fds[1].endswith("activation.log.fds"), listing)


if __name__ == "__main__":
    unittest.main()
