#!/usr/bin/env python3
"""Closures through the controller against nix copy with a file:// cache, in
one run on one machine (docs/BENCHMARKS.md, "Closures").

    MUSTER_BIN_DIR=build/release python3 bench/closures.py [--mib 1024]

Builds a toplevel whose closure holds MIB of random data (incompressible: the
worst case for time, the honest case for bytes), then measures
  upload   muster cache push             vs  nix copy --to file://…?compression=zstd
  fetch    publish → agent realised it    vs  nix-store --realise from that file:// cache
                                         and from the same directory over HTTP (a
                                         sendfile server on loopback: nix's own HTTP
                                         cost, the floor for any HTTP substituter)
and the peak RSS (VmHWM) of the controller and the agent. Prints one JSON object.
With --store postgresql the controller runs on a PostgreSQL store (a server
started here, fsync on) and keeps the cache's bytes in it (--cache-storage auto).
With --max-rss-mib N it fails (exit 1) when either peak exceeds N MiB: memory
is bounded by chunk sizes and windows, never by the closure's size (run it with
--mib 1024 to check that on a closure of 1 GiB).
With --perf DIR, the muster fetch is recorded system-wide (perf record -a, DWARF call graphs) to
DIR/fetch.perf, with a per-process and per-library summary in DIR/fetch.txt.
"""
import argparse
import http.server
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import Env, nix_env  # noqa: E402
import pg  # noqa: E402


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    """utime+stime of pid and of its waited-for children, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_model():
    r = subprocess.run(["lscpu"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


class SendfileHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of files under the server's root, the body by sendfile."""
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):  # noqa: N802
        self.serve(body=False)

    def do_GET(self):  # noqa: N802
        self.serve(body=True)

    def serve(self, body):
        path = os.path.join(self.server.root, self.path.lstrip("/").split("?")[0])
        if ".." in self.path or not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if body:
                self.wfile.flush()
                self.connection.sendfile(f)

    def log_message(self, *args):
        pass


def serve_directory(root):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SendfileHandler)
    srv.daemon_threads = True
    srv.root = root
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def perf_summary(data, out):
    with open(out, "w") as f:
        for sort in ("comm", "comm,dso", "comm,dso,sym"):
            r = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "-g", "none",
                                "--sort", sort, "--percent-limit", "0.5"],
                               capture_output=True, text=True)
            f.write(f"### --sort {sort}\n" + r.stdout + "\n")


def timed(argv, **kw):
    t = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env=nix_env(), **kw)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--payload", choices=["random", "text"], default="random",
                    help="random: incompressible (sent uncompressed); text: hex digits, "
                         "which zstd halves")
    ap.add_argument("--max-rss-mib", type=float, default=0,
                    help="fail when the controller's or the agent's peak RSS exceeds this")
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--perf", metavar="DIR", help="record the muster fetch with perf into DIR")
    args = ap.parse_args()
    size = args.mib << 20
    env = Env("bench-closures")
    server = db = None
    try:
        if args.store == "postgresql":
            server = pg.PgServer(durable=True).start()
            db = server.new_database()
            env.store = server.uri(db)
        env.start()
        agent = env.add_agent("m1", realiseTimeout=7200).start()
        key = os.path.join(env.cli_dir, "cache.key")
        env.cli("key", "generate", "--cache", "--out", key)
        extra = {"payloadKind": "text"} if args.payload == "text" else {}
        top = env.build("bench", push=False, delete=False, payload=size, **extra)
        closure = subprocess.run(["nix-store", "-q", "--requisites", top], capture_output=True,
                                 text=True, env=nix_env(), check=True).stdout.split()
        nar_bytes = sum(int(json.loads(subprocess.run(
            ["nix", "path-info", "--json", p], capture_output=True, text=True, env=nix_env(),
            check=True).stdout)[0]["narSize"]) for p in closure)

        cpid, apid = env.controller.proc.pid, agent.proc.proc.pid
        c0, k0 = cpu_s(cpid), children_cpu_s()
        t = time.monotonic()
        env.cli("cache", "push", top, "--cache-key", key, timeout=7200)
        up = time.monotonic() - t
        up_cpu = {"controller": cpu_s(cpid) - c0, "cli": children_cpu_s() - k0}
        stored = {"narinfo": {}, "fileBytes": 0}
        if server:
            infos = server.psql(db, "SELECT convert_from(c.data, 'UTF8') FROM cache_objects o "
                                    "JOIN cache_chunks c ON c.object = o.id WHERE o.key LIKE "
                                    "'%.narinfo'").splitlines()
            stored["fileBytes"] = int(server.psql(
                db, "SELECT COALESCE(SUM(size), 0) FROM cache_objects WHERE key LIKE 'nar/%'"))
            stored["databaseBytes"] = int(server.psql(db, f"SELECT pg_database_size('{db}')"))
        else:
            cdir = os.path.join(env.ctl_dir, "cache")
            infos = []
            for name in os.listdir(cdir):
                if name.endswith(".narinfo"):
                    with open(os.path.join(cdir, name)) as f:
                        infos += f.read().splitlines()
            for name in os.listdir(os.path.join(cdir, "nar")):
                stored["fileBytes"] += os.path.getsize(os.path.join(cdir, "nar", name))
        for line in infos:
            if line.startswith("Compression: "):
                c = line.split(": ", 1)[1].strip()
                stored["narinfo"][c] = stored["narinfo"].get(c, 0) + 1

        fcache = os.path.join(env.root, "filecache")
        url = f"file://{fcache}?compression=zstd"
        k0 = children_cpu_s()
        up_nix = timed(["nix", "copy", "--to", url, top])
        up_nix_cpu = children_cpu_s() - k0

        # The baseline first: once the agent set its profile, the closure is a GC root.
        env.delete_local(top)
        assert not os.path.exists(top)
        k0 = children_cpu_s()
        down_nix = timed(["nix-store", "--realise", top, "--option", "substituters", f"file://{fcache}",
                          "--option", "require-sigs", "false", "--max-jobs", "0"])
        down_nix_cpu = children_cpu_s() - k0

        env.delete_local(top)
        srv = serve_directory(fcache)
        k0 = children_cpu_s()
        down_http = timed(["nix-store", "--realise", top, "--option", "substituters",
                           f"http://127.0.0.1:{srv.server_address[1]}", "--option",
                           "require-sigs", "false", "--max-jobs", "0"])
        down_http_cpu = children_cpu_s() - k0
        srv.shutdown()

        env.delete_local(top)
        assert not os.path.exists(top)
        perf = None
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
            perf = subprocess.Popen(["perf", "record", "-a", "--call-graph", "dwarf,16384", "-F", "499", "-o",
                                     os.path.join(args.perf, "fetch.perf")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        c0, a0 = cpu_s(cpid), cpu_s(apid)
        t = time.monotonic()
        gen = int(env.cli("publish", "m1", top, "--cache-key", key).stdout.split("generation ")[1].split(":")[0])
        env.wait_phase("m1", gen, "succeeded", timeout=7200)
        down = time.monotonic() - t
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
            perf_summary(os.path.join(args.perf, "fetch.perf"),
                         os.path.join(args.perf, "fetch.txt"))
        down_cpu = {"controller": cpu_s(cpid) - c0, "agent+nix": cpu_s(apid) - a0}
        out = {
            "narBytes": nar_bytes,
            "paths": len(closure),
            "payload": args.payload,
            "store": args.store,
            "stored": stored,
            "upload": {"muster_s": round(up, 2), "nixCopy_s": round(up_nix, 2),
                       "muster_MiBps": round(nar_bytes / up / 2**20, 1),
                       "nixCopy_MiBps": round(nar_bytes / up_nix / 2**20, 1),
                       "muster_cpu_s": {k: round(v, 2) for k, v in up_cpu.items()},
                       "nixCopy_cpu_s": round(up_nix_cpu, 2)},
            "fetch": {"muster_s": round(down, 2), "nixRealiseFromFile_s": round(down_nix, 2),
                      "muster_MiBps": round(nar_bytes / down / 2**20, 1),
                      "nixRealiseFromFile_MiBps": round(nar_bytes / down_nix / 2**20, 1),
                      "nixRealiseFromHttp_s": round(down_http, 2),
                      "nixRealiseFromHttp_MiBps": round(nar_bytes / down_http / 2**20, 1),
                      "nixRealiseFromHttp_cpu_s": round(down_http_cpu, 2),
                      "muster_cpu_s": {k: round(v, 2) for k, v in down_cpu.items()},
                      "nixRealiseFromFile_cpu_s": round(down_nix_cpu, 2)},
            "peakRssMiB": {"controller": round(hwm_kib(env.controller.proc.pid) / 1024, 1),
                           "agent": round(hwm_kib(agent.proc.proc.pid) / 1024, 1)},
        }
        out["machine"] = {"cpu": cpu_model(), "nproc": os.cpu_count(),
                          "loadavg": open("/proc/loadavg").read().split()[:3]}
        print(json.dumps(out, indent=2))
        if args.max_rss_mib:
            for who, mib in out["peakRssMiB"].items():
                if mib > args.max_rss_mib:
                    print(f"{who} peak RSS {mib} MiB exceeds {args.max_rss_mib} MiB", file=sys.stderr)
                    sys.exit(1)
    finally:
        try:
            env.delete_local(top)
        except Exception:  # noqa: BLE001
            pass
        env.close()
        if server:
            server.close()


if __name__ == "__main__":
    main()
