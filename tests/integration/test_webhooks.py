"""Webhooks against a local HTTP receiver: deploy final states, rollout state
changes and offline machines, signed with HMAC-SHA256, retried with backoff,
queued durably across a controller restart, managed with `muster webhook`."""
import hashlib
import hmac
import http.server
import json
import threading
import time

from harness import EnvTest, wait_until


class Receiver:
    """http.server on loopback recording every POST; answers from `codes`
    (then 200 once they run out)."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.posts = []   # (monotonic time, headers dict, body bytes, answered code)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    code = outer.codes.pop(0) if outer.codes else 200
                    outer.posts.append((time.monotonic(), dict(self.headers), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self, event=None, pred=lambda body: True):
        """Bodies (parsed) answered 2xx, optionally of one event."""
        with self.lock:
            posts = list(self.posts)
        out = []
        for _, h, b, code in posts:
            if code // 100 != 2:
                continue
            body = json.loads(b)
            if (event is None or body["event"] == event) and pred(body):
                out.append(body)
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class WebhookTest(EnvTest):
    def receiver(self, codes=()):
        r = Receiver(codes)
        self.addCleanup(r.close)
        return r

    def add_hook(self, env, url, *events):
        args = ["webhook", "add", url, "--json"]
        for e in events:
            args += ["--event", e]
        out = json.loads(env.cli(*args).stdout)
        return out["id"], out["secret"]

    def test_deploys_and_rollouts_are_signed_notifications(self):
        env = self.env.start()
        rx = self.receiver()
        hook, secret = self.add_hook(env, rx.url)
        a = env.add_agent("web1", tags=["web"]).start()
        b = env.add_agent("web2", tags=["web"]).start()
        a.wait_connected()
        b.wait_connected()

        gen = env.publish("web1", env.build("hook-ok"))
        env.wait_phase("web1", gen, "succeeded")
        ok = wait_until(lambda: rx.delivered("deploy", lambda d: d["data"]["generation"] == gen),
                        30, what="deploy notification")
        self.assertEqual(len(ok), 1, "one notification per final state")
        body = ok[0]
        self.assertEqual(body["version"], 1)
        self.assertEqual(body["data"]["machine"], "web1")
        self.assertEqual(body["data"]["phase"], "succeeded")
        # The signature covers the exact bytes sent.
        with rx.lock:
            _, headers, raw, _ = next(p for p in rx.posts if json.loads(p[2])["id"] == body["id"])
        want = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        self.assertEqual(headers["X-Muster-Signature-256"], want)
        self.assertEqual(headers["X-Muster-Event"], "deploy")
        self.assertEqual(headers["X-Muster-Delivery"], body["id"])
        self.assertEqual(headers["Content-Type"], "application/json")

        bad = env.publish("web1", env.build("hook-bad", behaviour="fail"))
        failed = wait_until(lambda: rx.delivered("deploy", lambda d: d["data"]["generation"] == bad),
                            60, what="failed deploy notification")
        self.assertIn(failed[0]["data"]["phase"], ("failed", "rolled-back"))

        # A rollout: running, then succeeded, each once.
        r = env.cli("publish", "--tag", "web", env.build("hook-r"), "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public, "--max-failures", "1")
        rid = r.stdout.split("rollout ", 1)[1].split(":", 1)[0]
        done = wait_until(lambda: rx.delivered("rollout", lambda d: d["data"]["rollout"] == rid and
                                               d["data"]["state"] == "succeeded"),
                          90, what="rollout succeeded notification")
        self.assertEqual(done[0]["data"]["previousState"], "running")
        self.assertEqual(done[0]["data"]["total"], 2)
        states = [d["data"]["state"] for d in rx.delivered("rollout", lambda d: d["data"]["rollout"] == rid)]
        self.assertEqual(states.count("succeeded"), 1)

        listing = env.cli("webhook", "list").stdout
        self.assertIn(hook, listing)
        self.assertIn(rx.url, listing)
        self.assertNotIn(secret, listing + env.cli("webhook", "list", "--json").stdout)
        t = env.cli("webhook", "test", hook)
        self.assertIn("test delivered (HTTP 200)", t.stdout)
        self.assertTrue(rx.delivered("test"))

        env.cli("webhook", "remove", hook)
        self.assertNotIn(hook, env.cli("webhook", "list").stdout)
        r = env.cli("webhook", "add", "ftp://example.org/x", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("must start with http:// or https://", r.stderr)
        r = env.cli("webhook", "add", rx.url, "--event", "bogus", check=False)
        self.assertIn("unknown webhook event 'bogus'", r.stderr)

    def test_failed_deliveries_are_retried_with_backoff(self):
        env = self.env.start(["--webhook-retry-base-ms", "300"])
        rx = self.receiver(codes=[503, 500, 502])
        hook, _ = self.add_hook(env, rx.url, "test")
        t = env.cli("webhook", "test", hook, check=False)
        self.assertEqual(t.returncode, 1)
        self.assertIn("HTTP 503", t.stdout)
        self.assertIn("retried in", t.stdout)
        wait_until(lambda: rx.delivered("test"), 30, what="delivery after three failures")
        with rx.lock:
            posts = list(rx.posts)
        self.assertEqual([p[3] for p in posts], [503, 500, 502, 200])
        self.assertEqual(len({p[1]["X-Muster-Delivery"] for p in posts}), 1, "the same delivery")
        gaps = [b[0] - a[0] for a, b in zip(posts, posts[1:])]
        # 300 ms doubling, drawn from the upper half of each step.
        self.assertGreaterEqual(gaps[0], 0.14)
        self.assertGreaterEqual(gaps[2], 0.59)
        self.assertIn("0 deliveries queued", env.cli("webhook", "list").stdout)

    def test_queued_notifications_survive_a_controller_restart(self):
        env = self.env.start(["--webhook-retry-base-ms", "500"])
        rx = self.receiver(codes=[500] * 1000)  # down until told otherwise
        self.add_hook(env, rx.url, "deploy")
        a = env.add_agent("web1").start()
        a.wait_connected()
        gen = env.publish("web1", env.build("hook-restart"))
        env.wait_phase("web1", gen, "succeeded")
        wait_until(lambda: len(rx.posts) >= 1, 30, what="first (refused) attempt")
        self.assertIn("1 deliveries queued", env.cli("webhook", "list").stdout)
        env.controller.stop()
        with rx.lock:
            rx.codes.clear()  # the receiver is back
        env.start_controller(["--webhook-retry-base-ms", "500"])
        got = wait_until(lambda: rx.delivered("deploy"), 30, what="delivery after the restart")
        self.assertEqual(got[0]["data"]["generation"], gen)
        self.assertEqual(got[0]["data"]["phase"], "succeeded")
        wait_until(lambda: "0 deliveries queued" in env.cli("webhook", "list").stdout, 10,
                   what="queue drained")

    def test_machines_offline_longer_than_the_threshold(self):
        env = self.env.start(["--webhook-offline-after", "2"])
        rx = self.receiver()
        self.add_hook(env, rx.url, "offline")
        a = env.add_agent("web1").start()
        a.wait_connected()
        gone = time.monotonic()
        a.stop()
        got = wait_until(lambda: rx.delivered("offline"), 30, what="offline notification")
        self.assertGreaterEqual(time.monotonic() - gone, 2.0)
        self.assertEqual(got[0]["data"]["machine"], "web1")
        self.assertEqual(got[0]["data"]["thresholdSeconds"], 2)
        self.assertGreater(got[0]["data"]["lastSeen"], 0)
        # Back, then away again: a new absence, a new notification.
        a.start()
        a.wait_connected()
        a.stop()
        wait_until(lambda: len(rx.delivered("offline")) == 2, 30, what="second absence")
