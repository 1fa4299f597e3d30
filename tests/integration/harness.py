"""Test harness: runs the real muster binaries on loopback with real TLS, keys
and nix, in a temporary directory per test class.

Binaries come from MUSTER_BIN_DIR (set by CTest). Nix runs as root against the
local store with sandbox = false; fake toplevels are built from toplevel.nix,
pushed to a signed file:// binary cache and deleted from the local store so
that agents must realise them from the cache.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("MUSTER_BIN_DIR", os.path.join(HERE, "..", "..", "build", "dev"))
NIX_CONFIG = "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters =\n"


def binary(name):
    for sub in ("", "agent", "controller", "controller/cli"):
        p = os.path.join(BIN, sub, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise RuntimeError(f"binary {name} not found under {BIN}; set MUSTER_BIN_DIR")


def nix_env():
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG
    env.pop("NIX_REMOTE", None)
    return env


def wait_until(pred, timeout=30.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


class Process:
    """A background process with its output in a log file."""

    def __init__(self, argv, log_path, env=None):
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or nix_env())

    def text(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, timeout=30.0):
        rx = re.compile(pattern)
        def find():
            m = rx.search(self.text())
            return m
        return wait_until(find, timeout, what=f"log line /{pattern}/ in {self.log_path}")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill(self):
        return self.stop(signal.SIGKILL)


class Cache:
    """A signed file:// binary cache."""

    def __init__(self, root, name="muster-test-cache-1"):
        self.dir = os.path.join(root, "cache")
        os.makedirs(self.dir, exist_ok=True)
        self.secret = os.path.join(root, f"{name}.sk")
        with open(self.secret, "w") as out:
            subprocess.run(["nix", "key", "generate-secret", "--key-name", name],
                           stdout=out, check=True, env=nix_env())
        os.chmod(self.secret, 0o600)
        with open(self.secret) as inp:
            self.public = subprocess.run(["nix", "key", "convert-secret-to-public"],
                                         stdin=inp, capture_output=True, text=True,
                                         check=True, env=nix_env()).stdout.strip()
        self.url = "file://" + self.dir

    def push(self, path):
        subprocess.run(["nix", "store", "sign", "--key-file", self.secret, "--recursive", path],
                       check=True, env=nix_env(), capture_output=True)
        subprocess.run(["nix", "copy", "--to", self.url, path], check=True, env=nix_env(),
                       capture_output=True)


class Env:
    """One controller, its operator CLI, a binary cache and any number of agents."""

    def __init__(self, test_name="t"):
        self.root = tempfile.mkdtemp(prefix=f"muster-{test_name}-")
        os.chmod(self.root, 0o755)
        self.salt = uuid.uuid4().hex[:12]
        self.ctl_dir = os.path.join(self.root, "controller")
        self.cli_dir = os.path.join(self.root, "cli")
        os.makedirs(self.cli_dir)
        self.controller = None
        self.port = None
        self.pin = None
        self.agents = {}
        self.cache = None
        self._built = {}
        self.store = None  # --store for the controller (a postgresql:// URI), None = SQLite

    # ------------------------------------------------------------ controller
    def store_args(self):
        return ["--store", self.store] if self.store else []

    def init_controller(self):
        out = subprocess.run([binary("muster-controller"), "init", "--state-dir", self.ctl_dir,
                              *self.store_args()],
                             capture_output=True, text=True, check=True).stdout
        self.pin = re.search(r"pin:\s+(sha256:[0-9a-f]{64})", out).group(1)
        self.op_key = os.path.join(self.cli_dir, "operator.key")
        pub = subprocess.run([binary("muster"), "--key", self.op_key, "key", "generate"],
                             capture_output=True, text=True, check=True).stdout.strip()
        self.op_pub = pub
        subprocess.run([binary("muster-controller"), "operator", "add", "alice", "--key", pub,
                        "--state-dir", self.ctl_dir, *self.store_args()], check=True,
                       capture_output=True)

    def start_controller(self, extra=(), port=None):
        listen = f"127.0.0.1:{port if port is not None else (self.port or 0)}"
        log = os.path.join(self.root, "controller.log")
        rx = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
        before = 0
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                before = len(rx.findall(f.read()))
        self.controller = Process([binary("muster-controller"), "run", "--state-dir", self.ctl_dir,
                                   "--listen", listen, *self.store_args(), *extra], log)
        # The log accumulates across restarts: wait for this run's line.
        ports = wait_until(lambda: (lambda p: p if len(p) > before else None)(
            rx.findall(self.controller.text())), 30, what="controller listening")
        self.port = int(ports[-1])
        self.write_cli_config()
        return self.controller

    def write_cli_config(self, name="config.json", **extra):
        # Written aside and renamed: tests rewrite a config while another
        # thread's CLI reads it, which must never see half a file.
        path = os.path.join(self.cli_dir, name)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"controller": self.url(), "pin": self.pin, "key": self.op_key, **extra}, f)
        os.replace(tmp, path)
        return path

    def url(self, port=None):
        return f"wss://127.0.0.1:{port or self.port}"

    def start(self, extra=()):
        self.init_controller()
        self.start_controller(extra)
        return self

    # ------------------------------------------------------------------- CLI
    def cli(self, *args, check=True, timeout=120, key=None, config=None):
        argv = [binary("muster"), "--config", config or os.path.join(self.cli_dir, "config.json")]
        if key:
            argv += ["--key", key]
        r = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout,
                           env=self.cli_env())
        if check and r.returncode != 0:
            raise AssertionError(f"muster {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def cli_env(self):
        """The CLI's environment: its roster memory (roster-seen.json) lives in
        this test's directory."""
        env = nix_env()
        env["XDG_STATE_HOME"] = os.path.join(self.cli_dir, "state")
        return env

    def status(self, machine):
        r = self.cli("status", machine, "--json")
        return json.loads(r.stdout)[0]

    def wait_phase(self, machine, generation, phases, timeout=60):
        phases = {phases} if isinstance(phases, str) else set(phases)
        def check():
            s = self.status(machine)
            if s["generation"] == generation and s["phase"] in phases:
                return s
            return None
        try:
            return wait_until(check, timeout, interval=0.2,
                              what=f"{machine} generation {generation} in {phases}")
        except AssertionError:
            self.dump_logs()
            raise

    def history(self, machine):
        return json.loads(self.cli("history", machine, "--json", "--limit", "50").stdout)

    def events(self, machine, generation):
        for g in self.history(machine):
            if g["generation"] == generation:
                return [e["phase"] for e in g["events"]]
        return []

    # ---------------------------------------------------------------- agents
    def add_agent(self, name, tags=(), register=True, **cfg):
        a = Agent(self, name, cfg)
        if register:
            args = ["machine", "add", name, "--key", a.public_key()]
            for t in tags:
                args += ["--tag", t]
            self.cli(*args)
        self.agents[name] = a
        return a

    # ------------------------------------------------------------ toplevels
    def ensure_cache(self):
        if self.cache is None:
            self.cache = Cache(self.root)
        return self.cache

    def build(self, name, kind="nixos", behaviour="ok", kernel="6.1.0", push=True, delete=True,
              log=None, sleep=0, payload=0, **argstr):
        """Builds a fake toplevel; pushes it to the signed cache and deletes it
        locally so that the agent must substitute it. Further keyword arguments
        are toplevel.nix arguments (kernelSize, restartUnits, …)."""
        log = log or os.path.join(self.root, "activation.log")
        args = ["nix-build", "--no-out-link", os.path.join(HERE, "toplevel.nix"),
                "--argstr", "name", name, "--argstr", "kind", kind, "--argstr", "behaviour", behaviour,
                "--argstr", "log", log, "--argstr", "cutFile", os.path.join(self.root, "cut"),
                "--argstr", "kernel", kernel, "--argstr", "salt", self.salt,
                "--argstr", "sleep", str(sleep)]
        if payload:
            args += ["--argstr", "payload", str(payload)]
        for k, v in argstr.items():
            args += ["--argstr", k, str(v)]
        r = subprocess.run(args, capture_output=True, text=True, env=nix_env())
        if r.returncode != 0:
            raise AssertionError(f"nix-build failed: {r.stderr}")
        path = r.stdout.strip().splitlines()[-1]
        if push:
            self.ensure_cache().push(path)
        if delete:
            self.delete_local(path)
        return path

    def delete_local(self, path):
        closure = subprocess.run(["nix-store", "-q", "--requisites", path], capture_output=True,
                                 text=True, env=nix_env()).stdout.split()
        # Only this test's own (salted) paths; one at a time, referrers first, so
        # that a path still held by an earlier deploy does not block the others.
        for p in reversed(closure):
            subprocess.run(["nix-store", "--delete", p], capture_output=True, env=nix_env())

    def publish(self, machine, path, *extra, check=True):
        args = ["publish", machine, path]
        if self.cache is not None:
            args += ["--substituter", self.cache.url, "--trusted-public-key", self.cache.public]
        r = self.cli(*args, *extra, check=check)
        if check:
            m = re.search(r"generation (\d+)", r.stdout)
            return int(m.group(1)) if m else json.loads(r.stdout)["generation"]
        return r

    def activation_log(self):
        p = os.path.join(self.root, "activation.log")
        if not os.path.exists(p):
            return []
        with open(p) as f:
            return [l.strip() for l in f if l.strip()]

    # --------------------------------------------------------------- teardown
    def dump_logs(self):
        for p in sorted(os.listdir(self.root)):
            if p.endswith(".log"):
                with open(os.path.join(self.root, p), errors="replace") as f:
                    text = f.read()
                sys.stderr.write(f"\n===== {p} (last 4000 chars) =====\n{text[-4000:]}\n")

    def close(self, keep=False):
        for a in self.agents.values():
            a.stop()
        if self.controller:
            self.controller.stop()
        if not keep and not os.environ.get("MUSTER_KEEP_TEST_DIRS"):
            shutil.rmtree(self.root, ignore_errors=True)


class Agent:
    def __init__(self, env, name, cfg):
        self.env = env
        self.name = name
        self.root = os.path.join(env.root, "agents", name)
        self.state = os.path.join(self.root, "state")
        self.vars = os.path.join(self.root, "vars", "sops-nix")
        self.profile = os.path.join(self.root, "profiles", "system")
        self.current = os.path.join(self.root, "run", "current-system")
        self.booted = os.path.join(self.root, "run", "booted-system")
        os.makedirs(os.path.join(self.root, "run"), exist_ok=True)
        self.config_path = os.path.join(self.root, "agent.json")
        self.cfg = {
            "machine": name,
            "controllers": [env.url()],
            "controllerPin": env.pin,
            "trustedOperatorKeys": [env.op_pub],
            "stateDir": self.state,
            "varsDir": self.vars,
            "profile": self.profile,
            "currentSystem": self.current,
            "bootedSystem": self.booted,
            "confirmTimeout": 20,
            "systemdRun": "never",
            "backoffBase": 0.1,
            "backoffCap": 1,
            "logLevel": "debug",
        }
        self.cfg.update(cfg)
        self.write_config()
        self.proc = None

    def write_config(self):
        with open(self.config_path, "w") as f:
            json.dump(self.cfg, f, indent=2)

    def public_key(self):
        return subprocess.run([binary("muster-agent"), "--config", self.config_path, "--print-key"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def start(self):
        self.proc = Process([binary("muster-agent"), "--config", self.config_path],
                            os.path.join(self.env.root, f"agent-{self.name}.log"))
        return self

    def wait_connected(self, timeout=30):
        return wait_until(lambda: self.env.status(self.name)["online"], timeout,
                          what=f"{self.name} online")

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc = None

    def kill(self):
        if self.proc:
            self.proc.kill()
            self.proc = None

    def state_json(self):
        with open(os.path.join(self.state, "state.json")) as f:
            return json.load(f)

    def current_system(self):
        try:
            return os.path.realpath(self.current) if os.path.lexists(self.current) else None
        except OSError:
            return None


class EnvTest(unittest.TestCase):
    """Base class: a fresh Env per test; logs are printed when a test fails."""

    def setUp(self):
        self.env = Env(self._testMethodName)
        self.addCleanup(self._cleanup)

    def _cleanup(self):
        failed = False
        outcome = getattr(self, "_outcome", None)
        if outcome is not None:
            result = getattr(outcome, "result", None)
            if result is not None:
                failed = any(t is self for t, _ in result.failures + result.errors)
        if failed:
            self.env.dump_logs()
        self.env.close(keep=failed)


class CuttableProxy:
    """A loopback TCP proxy to the controller that goes dark while `cut_file`
    exists: open connections are dropped and new ones are closed at once. A
    toplevel built with behaviour "cut" creates that file when activated (its
    networking "breaks"); an ok toplevel's activation removes it."""

    def __init__(self, target_port, cut_file):
        self.target_port = target_port
        self.cut_file = cut_file
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def cut(self):
        return os.path.exists(self.cut_file)

    def _drop_all(self):
        with self.lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass
            self.conns = []

    def _watch(self):
        while self.running:
            if self.cut():
                self._drop_all()
            time.sleep(0.05)

    def _accept(self):
        while self.running:
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.cut():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data or self.cut():  # a cut path forwards nothing more
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self.running = False
        self.sock.close()
        self._drop_all()
