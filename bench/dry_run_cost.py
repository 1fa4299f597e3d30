#!/usr/bin/env python3
"""What the agent's free-space check costs per deploy: `nix-store --realise
--dry-run` (what the agent runs before every realise, docs/FLEET.md) against the
realise itself, same closure, same signed file:// cache, same run.

  bench/dry_run_cost.py [PAYLOAD_BYTES] [RUNS]

Builds a fake toplevel (tests/integration/toplevel.nix) with a payload of
PAYLOAD_BYTES (default 16 MiB), copies it to a signed file:// cache in a
temporary directory, deletes it locally, then times RUNS dry runs and RUNS
realises (each realise from an empty store). Prints medians, min and max.
"""
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOPLEVEL = os.path.join(HERE, "..", "tests", "integration", "toplevel.nix")


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, check=True, **kw)


def delete(top):
    paths = run(["nix-store", "-q", "--requisites", top]).stdout.split()
    for p in reversed(paths):
        subprocess.run(["nix-store", "--delete", p], capture_output=True)


def main():
    payload = int(sys.argv[1]) if len(sys.argv) > 1 else 16 << 20
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    os.environ["NIX_CONFIG"] = ("sandbox = false\nbuild-users-group =\n"
                                "experimental-features = nix-command\nsubstituters =\n")
    with tempfile.TemporaryDirectory() as d:
        sk, pk = os.path.join(d, "sk"), os.path.join(d, "pk")
        run(["nix-store", "--generate-binary-cache-key", "dry-run-bench-1", sk, pk])
        top = run(["nix-build", "--no-out-link", TOPLEVEL, "--argstr", "name", "bench",
                   "--argstr", "salt", "bench%d" % random.getrandbits(32),
                   "--argstr", "payload", str(payload)]).stdout.split()[-1]
        cache = "file://%s/cache" % d
        run(["nix", "copy", "--to", cache + "?compression=zstd", top])
        run(["nix", "store", "sign", "--key-file", sk, "--store", cache, "-r", top])
        delete(top)
        opts = ["--max-jobs", "0", "--option", "substituters", cache,
                "--option", "trusted-public-keys", open(pk).read().strip()]

        def timed(args):
            t = time.monotonic()
            r = subprocess.run(args, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            return (time.monotonic() - t) * 1000, r.stderr

        dry = []
        for _ in range(runs):
            ms, err = timed(["nix-store", "--realise", "--dry-run", top] + opts)
            dry.append(ms)
        summary = [l for l in err.splitlines() if "will be fetched" in l]
        real = []
        for _ in range(runs):
            ms, _ = timed(["nix-store", "--realise", top] + opts)
            real.append(ms)
            delete(top)
        dry.sort()
        real.sort()
        print(summary[0] if summary else "(nothing to fetch)")
        print("dry-run: median %.0f ms (min %.0f, max %.0f) over %d runs" %
              (dry[len(dry) // 2], dry[0], dry[-1], runs))
        print("realise: median %.0f ms (min %.0f, max %.0f) over %d runs" %
              (real[len(real) // 2], real[0], real[-1], runs))


if __name__ == "__main__":
    main()
