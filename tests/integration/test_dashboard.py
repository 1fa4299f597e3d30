"""The web dashboard (--http-listen) in headless Chromium: pages load without
console errors, live deploys and rollouts update the page without a reload,
agent-supplied strings stay text, and beyond loopback a token is needed.

Screenshots go to $MUSTER_BIN_DIR/test-artefacts/dashboard/."""
import hashlib
import json
import os
import re
import socket
import urllib.error
import urllib.request

from browser import Browser
from harness import BIN, EnvTest, wait_until
from rawclient import Identity, WsConn

ARTEFACTS = os.path.join(BIN, "test-artefacts", "dashboard")


def dashboard_port(env):
    ports = wait_until(lambda: re.findall(r"dashboard on http://[^:]+:(\d+)/", env.controller.text()),
                       30, what="dashboard listening")
    return int(ports[-1])


def get(url, headers=None):
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


class DashboardTest(EnvTest):
    def browser(self):
        b = Browser(os.path.join(self.env.root, "chromium.log"))
        self.addCleanup(b.close)
        return b

    def shot(self, b, name):
        return b.screenshot(os.path.join(ARTEFACTS, f"{self._testMethodName}-{name}.png"))

    def assertClean(self, b):
        b.pump(0.3)
        self.assertEqual(b.problems, [], "the page logged errors")

    def test_live_deploy_and_rollout_update_the_pages_without_reload(self):
        env = self.env.start(["--http-listen", "127.0.0.1:0"])
        base = f"http://127.0.0.1:{dashboard_port(env)}"
        a = env.add_agent("web1", tags=["web"]).start()
        env.add_agent("web2", tags=["web"])  # registered, not started yet
        a.wait_connected()
        b = self.browser()

        b.navigate(base + "/")
        b.wait_for("document.getElementById('live').textContent === 'live'", 20, "event stream open")
        rows = b.eval("Array.from(document.querySelectorAll('tr.machine')).map(r => r.dataset.machine)")
        self.assertEqual(rows, ["web1", "web2"])
        row = "Array.from(document.querySelectorAll('tr.machine')).find(r => r.dataset.machine === 'web1')"
        self.assertEqual(b.eval(row + ".querySelector('.c-online').textContent"), "online")
        self.assertEqual(b.eval(row + ".querySelector('.c-phase').textContent"), "idle")
        self.shot(b, "fleet-before")
        b.eval("window.__mark = 'no reload'")

        gen = env.publish("web1", env.build("dash-a"))
        b.wait_for(row + ".querySelector('.c-phase').textContent === 'succeeded'", 60,
                   "web1 succeeded on the fleet page")
        self.assertEqual(b.eval(row + ".querySelector('.c-generation').textContent"), str(gen))
        self.assertEqual(b.eval(row + ".querySelector('.c-target').textContent"), str(gen))
        self.assertEqual(b.eval("window.__mark"), "no reload", "the page must not reload")
        self.assertGreater(int(b.eval("document.body.dataset.applied")), 3)
        self.shot(b, "fleet-after-deploy")
        self.assertClean(b)

        # The machine page: history with every event, the log, then a live deploy.
        b.navigate(base + "/machine/web1")
        b.wait_for("document.getElementById('live').textContent === 'live'", 20, "event stream open")
        phases = b.eval("Array.from(document.querySelectorAll("
                        "'section.gen[data-generation=\"1\"] tr.event td:nth-child(2)'))"
                        ".map(t => t.textContent)")
        for p in ["verified", "realising", "activating", "confirming", "succeeded"]:
            self.assertIn(p, phases)
        self.assertIn("activating dash-a", b.eval("document.getElementById('log').textContent"))
        b.eval("window.__mark = 'machine page'")
        gen2 = env.publish("web1", env.build("dash-b"))
        sec = f"document.querySelector('section.gen[data-generation=\"{gen2}\"]')"
        b.wait_for(f"{sec} && Array.from({sec}.querySelectorAll('tr.event td:nth-child(2)'))"
                   ".some(t => t.textContent === 'succeeded')", 60, "generation 2 events live")
        b.wait_for("document.getElementById('log').textContent.includes('activating dash-b')", 30,
                   "live log lines")
        self.assertEqual(b.eval("document.getElementById('phase').textContent"), "succeeded")
        self.assertEqual(b.eval("window.__mark"), "machine page")
        self.shot(b, "machine")
        self.assertClean(b)

        # A rollout over both machines: web2 is offline, so it waits.
        r = env.cli("publish", "--tag", "web", env.build("dash-c"), "--substituter", env.cache.url,
                    "--trusted-public-key", env.cache.public)
        rid = re.search(r"rollout (r[0-9a-f]+)", r.stdout).group(1)
        b.navigate(base + "/rollouts")
        self.assertIn(rid, b.eval("Array.from(document.querySelectorAll('tr.rollout'))"
                                  ".map(r => r.dataset.rollout)"))
        b.navigate(f"{base}/rollout/{rid}")
        b.wait_for("document.getElementById('live').textContent === 'live'", 20, "event stream open")
        item = ("Array.from(document.querySelectorAll('tr.item')).find(r => r.dataset.machine === "
                "'{}').querySelector('.c-state').textContent")
        b.wait_for(item.format("web1") + " === 'succeeded'", 60, "web1 succeeded in the rollout")
        self.assertEqual(b.eval(item.format("web2")), "pending")
        self.assertEqual(b.eval("document.getElementById('rollout-state').textContent"), "running")
        b.eval("window.__mark = 'rollout page'")
        self.shot(b, "rollout-waiting")
        env.agents["web2"].start()
        b.wait_for(item.format("web2") + " === 'succeeded'", 90, "web2 released and succeeded live")
        b.wait_for("document.getElementById('rollout-state').textContent === 'succeeded'", 30,
                   "rollout succeeded")
        self.assertEqual(b.eval("window.__mark"), "rollout page")
        self.shot(b, "rollout-done")
        self.assertClean(b)

    def test_agent_supplied_strings_stay_text(self):
        env = self.env.start(["--http-listen", "127.0.0.1:0"])
        base = f"http://127.0.0.1:{dashboard_port(env)}"
        ident = Identity(env.root, "evil")
        env.cli("machine", "add", "evil", "--key", ident.public)
        payload = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>"
        conn = WsConn(env.port, ident)
        self.addCleanup(conn.close)
        send = lambda m: conn.send_frame(json.dumps(m).encode())
        send({"v": 1, "type": "hello",
              "body": {"machine": "evil", "agentVersion": payload,
                       "facts": {"hostname": payload, "os": payload, "system": "x86_64-linux"},
                       "generation": 0, "phase": "idle", "lastApplied": 0}})
        b = self.browser()
        # The error detector itself: a console error and a failed load are caught.
        b.navigate(base + "/machine/nope")
        b.eval("console.error('probe')")
        b.pump(0.3)
        self.assertTrue(any("probe" in p for p in b.problems), b.problems)
        self.assertTrue(any("404" in p for p in b.problems), b.problems)
        b.problems.clear()
        b.navigate(base + "/")
        b.wait_for("document.getElementById('live').textContent === 'live'", 20, "event stream open")
        # A report arriving live is as hostile as one rendered by the server.
        send({"v": 1, "type": "status",
              "body": {"seq": 1, "generation": 0, "phase": "failed", "detail": payload}})
        row = "Array.from(document.querySelectorAll('tr.machine')).find(r => r.dataset.machine === 'evil')"
        b.wait_for(row + ".querySelector('.c-detail').textContent === " + json.dumps(payload), 30,
                   "hostile detail shown as text")
        self.assertEqual(b.eval("document.querySelectorAll('main img, main script').length"), 0)
        b.navigate(base + "/machine/evil")
        self.assertIn(payload, b.eval("document.body.textContent"))
        self.assertEqual(b.eval("document.querySelectorAll('main img, main script').length"), 0)
        self.assertIsNone(b.eval("window.__pwned"))
        self.shot(b, "hostile")
        self.assertClean(b)

    def test_beyond_loopback_a_token_is_needed(self):
        env = self.env.start(["--http-listen", "0.0.0.0:0"])
        base = f"http://127.0.0.1:{dashboard_port(env)}"
        self.assertIn("access token required", env.controller.text())
        status, _, body = get(base + "/")
        self.assertEqual(status, 401)
        self.assertIn("muster dashboard token", body)
        self.assertEqual(get(base + "/events")[0], 401)
        self.assertEqual(get(base + "/", {"Authorization": "Bearer " + "0" * 64})[0], 401)
        self.assertEqual(get(base + "/static/app.css")[0], 200)  # assets hold no data

        out = json.loads(env.cli("dashboard", "token", "--url", base, "--json").stdout)
        token, link = out["token"], out["url"]
        self.assertEqual(link, f"{base}/?token={token}")
        stored = b""
        for name in ("muster.db", "muster.db-wal"):  # recent writes sit in the WAL
            path = os.path.join(env.ctl_dir, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    stored += f.read()
        self.assertIn(hashlib.sha256(token.encode()).hexdigest().encode(), stored)
        self.assertNotIn(token.encode(), stored, "the controller stores only a hash")

        status, headers, _ = get(link)
        self.assertEqual(status, 303)
        self.assertEqual(headers["Location"], "/")
        self.assertIn("HttpOnly", headers["Set-Cookie"])
        self.assertEqual(get(base + "/", {"Authorization": "Bearer " + token})[0], 200)
        status, headers, _ = get(base + "/", {"Cookie": "muster_dashboard=" + token})
        self.assertEqual(status, 200)
        self.assertIn("script-src 'self'", headers["Content-Security-Policy"])

        # A browser follows the link, keeps the cookie, and its event stream works.
        b = self.browser()
        b.navigate(link)
        self.assertEqual(b.eval("location.href"), base + "/")
        b.wait_for("document.getElementById('live').textContent === 'live'", 20, "event stream open")
        self.shot(b, "token")
        self.assertClean(b)

        revoked = json.loads(env.cli("dashboard", "token", "--revoke-all", "--json").stdout)
        self.assertEqual(revoked["revoked"], 1)
        self.assertEqual(get(base + "/", {"Authorization": "Bearer " + token})[0], 401)

    def test_loopback_dashboard_refuses_foreign_host_names(self):
        env = self.env.start(["--http-listen", "127.0.0.1:0"])
        base = f"http://127.0.0.1:{dashboard_port(env)}"
        # A page on another site that rebinds its DNS name to 127.0.0.1.
        self.assertEqual(get(base + "/", {"Host": "attacker.example"})[0], 403)
        self.assertEqual(get(base + "/", {"Host": "localhost:1234"})[0], 200)
        self.assertEqual(get(base + "/machine/nope")[0], 404)
        s = socket.create_connection(("127.0.0.1", dashboard_port(env)), timeout=10)
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b" 405 ", s.recv(4096).split(b"\r\n")[0])
        s.close()
        # Junk gets the connection closed; the dashboard keeps serving.
        s = socket.create_connection(("127.0.0.1", dashboard_port(env)), timeout=10)
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        s.recv(4096)
        s.close()
        self.assertEqual(get(base + "/")[0], 200)
