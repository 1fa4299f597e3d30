"""Headless Chromium driven over the DevTools protocol, Python stdlib only.

Starts `chromium --headless --remote-debugging-port=0` with its own profile,
connects to the page target's websocket and offers what the dashboard tests
need: navigate and wait for load, evaluate JavaScript, screenshot, and every
console error, uncaught exception and failed load the page produced.
"""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM = os.environ.get("MUSTER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


class _Ws:
    """A minimal websocket client (RFC 6455) for the DevTools endpoint."""

    def __init__(self, url, timeout=30):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed during the websocket upgrade")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"DevTools refused the upgrade: {head[:200]!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def send(self, text):
        payload = text.encode()
        n = len(payload)
        hdr = bytes([0x81])
        if n < 126:
            hdr += bytes([0x80 | n])
        elif n < 65536:
            hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            hdr += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + body)

    def _frame(self):
        """Parses one frame from the buffer without consuming a partial one
        (a read timeout then loses nothing); None when incomplete."""
        b = self.buf
        if len(b) < 2:
            return None
        n, off = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, off = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, off = struct.unpack(">Q", b[2:10])[0], 10
        if b[1] & 0x80:
            off += 4  # servers do not mask; tolerate it anyway
        if len(b) < off + n:
            return None
        self.buf = b[off + n:]
        return b[0], b[off:off + n]

    def recv(self):
        """One text message (fragments joined)."""
        parts = []
        while True:
            f = self._frame()
            if f is None:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("DevTools connection closed")
                self.buf += chunk
                continue
            b0, data = f
            op = b0 & 0x0F
            if op == 0x8:
                raise ConnectionError("DevTools sent close")
            if op in (0x9, 0xA):
                continue
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    def __init__(self, log_path):
        self.profile = tempfile.mkdtemp(prefix="muster-chromium-")
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--disable-default-apps", "--window-size=1280,900",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) or os.path.getsize(port_file) == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start; see {log_path}")
            time.sleep(0.1)
        with open(port_file) as f:
            self.port = int(f.read().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list"))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = _Ws(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events = []     # every DevTools event received
        self.problems = []   # console errors, exceptions, failed loads
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    # ------------------------------------------------------------ protocol
    def _handle_event(self, m):
        self.events.append(m)
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.problems.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.problems.append("exception: " + d.get("text", "") + " " +
                                 str(d.get("exception", {}).get("description", "")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.problems.append(f"log error ({e.get('source')}): {e.get('text')} {e.get('url', '')}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            self.problems.append(f"load failed: {p.get('errorText')} ({p.get('type')})")

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self._handle_event(m)

    def pump(self, seconds):
        """Reads events for up to `seconds` (returns early on silence)."""
        self.ws.sock.settimeout(seconds)
        try:
            while True:
                self._handle_event(json.loads(self.ws.recv()))
        except (socket.timeout, TimeoutError):
            pass
        finally:
            self.ws.sock.settimeout(30)

    # -------------------------------------------------------------- helpers
    def navigate(self, url, timeout=30):
        before = len(self.events)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[before:]):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not finish loading in {timeout}s")
            self.pump(0.2)

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression, timeout=60, what=None):
        """Evaluates expression until it is truthy, handling events meanwhile
        (woken by page activity, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.eval(expression)
            if last:
                return last
            self.pump(0.25)
        raise AssertionError(f"timed out waiting for {what or expression} (last: {last!r})")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
