#!/usr/bin/env python3
"""Closures through the controller against nix copy with a file:// cache, in
one run on one machine (docs/BENCHMARKS.md, "Closures").

    MUSTER_BIN_DIR=build/release python3 bench/closures.py [--mib 1024]

Builds a toplevel whose closure holds MIB of random data (incompressible: the
worst case for time, the honest case for bytes), then measures
  upload   muster cache push             vs  nix copy --to file://…?compression=zstd
  fetch    publish → agent realised it    vs  nix-store --realise from that file:// cache
and the peak RSS (VmHWM) of the controller and the agent. Prints one JSON object.
With --store postgresql the controller runs on a PostgreSQL store (a server
started here, fsync on) and keeps the cache's bytes in it (--cache-storage auto).
With --max-rss-mib N it fails (exit 1) when either peak exceeds N MiB: memory
is bounded by chunk sizes and windows, never by the closure's size (run it with
--mib 1024 to check that on a closure of 1 GiB).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
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
        assert not os.path.exists(top)
        c0, a0 = cpu_s(cpid), cpu_s(apid)
        t = time.monotonic()
        gen = int(env.cli("publish", "m1", top, "--cache-key", key).stdout.split("generation ")[1].split(":")[0])
        env.wait_phase("m1", gen, "succeeded", timeout=7200)
        down = time.monotonic() - t
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
