#!/usr/bin/env python3
"""Renders the JSON results of bench/run.sh as Markdown tables: summarize.py OUT_DIR."""
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def f(x, digits=0):
    return "–" if x is None else f"{x:,.{digits}f}"


def pct(d, key="p50"):
    return f(d.get(key), 0) if d and d.get("n") else "–"


print("# muster benchmark results\n")
print("```\n" + open(os.path.join(out, "machine.txt")).read().strip() + "\n```\n")
b1, bn = load("baseline-1.json"), load("baseline-n.json")
if b1 and bn:
    print("## Baseline: in-memory mTLS handshakes (TLS 1.3, Ed25519 client and server certificates)\n")
    print("| threads | handshakes/s |\n|---:|---:|")
    print(f"| {b1['threads']} | {f(b1['perSecond'])} |\n| {bn['threads']} | {f(bn['perSecond'])} |\n")
base = bn["perSecond"] if bn else None

idle = load("idle.json")
if idle:
    print("## 1. Connect storm\n")
    print(f"At most {idle['inflight']} connection attempts in flight; load generator threads: {idle['threads']}.\n")
    print("| new agents | seconds | handshakes/s | vs baseline | handshake p50 / p99 ms | controller CPU % of one core |")
    print("|---:|---:|---:|---:|---:|---:|")
    for st in idle.get("stages", []):
        s = st["storm"]
        ratio = f"{s['handshakesPerSecond'] / base * 100:.0f} %" if base else "–"
        print(f"| {s['newAgents']:,} | {s['seconds']:.2f} | {f(s['handshakesPerSecond'])} | {ratio} | "
              f"{pct(s['handshakeMs'])} / {pct(s['handshakeMs'], 'p99')} | {f(s['controllerCpuPercentOfOneCore'])} |")
    print("\n## 2. Idle hold (agents ping every %d s, controller every 30 s)\n" % idle["pingInterval"])
    print("| agents | controller RSS MiB | RSS per agent KiB | controller CPU % of one core | load generator RSS per agent KiB |")
    print("|---:|---:|---:|---:|---:|")
    for st in idle.get("stages", []):
        i = st.get("idle")
        if not i:
            continue
        print(f"| {st['agents']:,} | {i['controllerRssKiB'] / 1024:.0f} | {i['controllerRssPerAgentKiB']:.1f} | "
              f"{i['controllerCpuPercentOfOneCore']:.2f} | {i['loadgenRssPerAgentKiB']:.1f} |")
    print(f"\nController RSS before any agent: {idle['controllerRssBeforeKiB'] / 1024:.0f} MiB. "
          f"Failures: {idle.get('failures', 'none')}; errors: {idle.get('errors') or 'none'}.\n")

fan = load("fanout.json")
if fan and "fanout" in fan:
    fo = fan["fanout"]
    print(f"## 3. Fan-out: one generation to each of {fo['agents']:,} agents (pipelined `publish` requests)\n")
    print("Times in ms from the first publish request.\n")
    print("| | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|")
    for label, key in [("publish answered", "publishResponseMs"), ("deploy received (notified)", "notifyMs"),
                       ("first report acked (receipt acknowledged)", "receivedAckMs"),
                       ("last report acked (succeeded)", "ackMs")]:
        d = fo.get(key)
        if d:
            print(f"| {label} | {pct(d)} | {pct(d, 'p90')} | {pct(d, 'p99')} | {pct(d, 'max')} |")
    print(f"\nPublishes/s: {f(fo['publishesPerSecond'])}; notified {fo['notified']:,}, acknowledged "
          f"{fo['acknowledged']:,}; controller CPU {fo['controllerCpuSeconds']:.1f} s.\n")
if fan and "reconnect" in fan:
    r = fan["reconnect"]
    print(f"## 4. Reconnect storm: SIGKILL and restart under {r['agents']:,} agents (full jitter, 1 s base, 60 s cap)\n")
    ratio = lambda x: f"{x / base * 100:.0f} %" if base else "–"
    print("| | value |\n|---|---:|")
    print(f"| agents back | {r['returned']:,} |")
    print(f"| seconds from SIGKILL to all back | {r['secondsToAllBack']:.2f} |")
    print(f"| restart to first accepted connection, ms | {r['restartToFirstAcceptMs']:.0f} |")
    print(f"| mean re-authentication rate, first arrival to last welcome, /s | {f(r['meanRatePerSecond'])} ({ratio(r['meanRatePerSecond'])} of baseline) |")
    print(f"| peak 1 s re-authentication rate, /s | {f(r['peakRatePerSecond'])} ({ratio(r['peakRatePerSecond'])} of baseline) |")
    print(f"| handshake (TCP up to welcome) p50 / p99 ms | {pct(r['handshakeMs'])} / {pct(r['handshakeMs'], 'p99')} |")
    print(f"\nExpected failures while the controller was down: {r.get('expectedFailures')}\n")
if fan:
    print(f"Fan-out run failures: {fan.get('failures', 'none')}; errors: {fan.get('errors') or 'none'}.\n")

ag = load("agent.json")
if ag:
    print("## 5. Real muster-agent, idle and connected\n")
    print("| RSS MiB | of which private MiB | PSS MiB | anonymous MiB | peak RSS MiB | CPU % of one core | threads |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    mib = lambda k: f"{ag[k] / 1024:.1f}" if ag.get(k) is not None else "–"
    print(f"| {mib('rssKiB')} | {mib('privateKiB')} | {mib('pssKiB')} | {mib('anonymousKiB')} | {mib('hwmKiB')} | "
          f"{ag['cpuPercentOfOneCore']:.3f} | {ag['threads']} |")
    print("\nRSS counts shared library pages (libcrypto, libstdc++, libc) in full; private and PSS do not.")
