#!/usr/bin/env python3
"""Dashboard page cost: time to serve the fleet page (/) for N registered
machines, against /metrics on the same controller and store (same run) as the
baseline; both walk every machine. Prints a Markdown table row.

Usage: bench/dashboard.py BUILD_DIR [N] [REPEATS]
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def main():
    build = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    ctl = os.path.join(build, "controller", "muster-controller")
    loadgen = os.path.join(build, "bench", "muster-loadgen")
    d = tempfile.mkdtemp(prefix="muster-bench-dash-")
    proc = None
    try:
        state = os.path.join(d, "state")
        subprocess.run([ctl, "init", "--state-dir", state], check=True, capture_output=True)
        subprocess.run([loadgen, "register", "--state-dir", state, "--count", str(n)], check=True,
                       capture_output=True)
        log = open(os.path.join(d, "controller.log"), "w")
        proc = subprocess.Popen([ctl, "run", "--state-dir", state, "--listen", "127.0.0.1:0",
                                 "--http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                                 "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT)
        dash = metrics = None
        for _ in range(300):
            text = open(os.path.join(d, "controller.log")).read()
            m1 = re.search(r"dashboard on http://127\.0\.0\.1:(\d+)/", text)
            m2 = re.search(r"metrics on 127\.0\.0\.1:(\d+)", text)
            if m1 and m2:
                dash, metrics = int(m1.group(1)), int(m2.group(1))
                break
            time.sleep(0.1)
        if dash is None:
            raise SystemExit("controller did not start:\n" + text)

        def measure(url):
            times, size = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                body = urllib.request.urlopen(url, timeout=60).read()
                times.append((time.perf_counter() - t0) * 1000)
                size = len(body)
            return statistics.median(times), max(times), size

        page = measure(f"http://127.0.0.1:{dash}/")
        base = measure(f"http://127.0.0.1:{metrics}/metrics")
        print("| machines | fleet page p50 / max (ms) | page bytes | /metrics p50 / max (ms), same run |")
        print("|---|---|---|---|")
        print(f"| {n} | {page[0]:.1f} / {page[1]:.1f} | {page[2]} | {base[0]:.1f} / {base[1]:.1f} |")
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
