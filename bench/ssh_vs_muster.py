#!/usr/bin/env python3
"""muster vs SSH push, side by side, on this one host (docs/BENCHMARKS.md,
"muster vs SSH push"; issue 12 target 6).

    MUSTER_BIN_DIR=build/release python3 bench/ssh_vs_muster.py --machines 20 --runs 3

N "machines", each with its own sshd (Debian openssh-server, listening on a
loopback address of its own, 127.1.x.y, with its own host key) and its own
real muster-agent connected to one real controller, both sides sharing the
machine's sandbox root (profile, current-system link, agent state). Every run
builds one fresh fake toplevel per mode from tests/integration/toplevel.nix
(its switch-to-configuration appends to an activation log and points the
machine's current-system link at itself) and deploys it to all N machines:

  clan     per machine `nix copy --to ssh-ng://root@ADDR P` and then
           `ssh root@ADDR 'nix-env -p PROFILE --set P && P/bin/switch-to-configuration switch'`,
           all machines at once (what `clan machines update` does for several machines)
  colmena  the same, 10 machines at a time (colmena's default --parallel 10)
  mux      as clan, but both steps over one SSH connection per machine (a
           ControlMaster, as nixos-rebuild --target-host keeps); not in the default
           --modes
  muster   one `muster publish --all P` (a rollout: no canary, unlimited parallelism)
           to the connected agents

Measured per run and mode:
  activated  seconds from starting the command to the last machine's activation,
             read from what switch-to-configuration recorded: the mtime of the
             current-system link it created (lstat, ns resolution);
  operator CPU  user+sys seconds of the operator side: for clan/colmena every
             ssh and nix process the driver started (RUSAGE_CHILDREN, so the
             ssh children of nix copy too); for muster the CLI process plus the
             controller's CPU (from /proc/PID/stat) from the command until every
             agent has recorded "succeeded" (confirmation included);
  command    seconds until the command(s) returned.
Machine-side CPU (sshd, nix-daemon --stdio, nix-env, muster-agent, nix-store)
is not operator CPU and is reported apart, as "machines CPU" (sshd and agents
via /proc, their reaped children included).

Store: all machines and the operator share this host's Nix store, so the
toplevel is valid on every "machine" before either side starts and neither
side transfers bytes (the closure is 3 paths of a few KiB anyway): what is
compared is the deploy mechanism. For muster the toplevel is also pushed to a
signed file:// cache named in the manifest, as a real operator would; the
agent's `nix-store --realise` finds it valid.

With --check (the CTest smoke, N=3) the run fails unless every machine
activated exactly the published toplevel in every mode; timings are printed,
never asserted. Exit 77 when sshd is not installed.
"""
import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import Env, Process, binary, nix_env, wait_until  # noqa: E402

SSHD = "/usr/sbin/sshd"
SSH_MODES = ("clan", "colmena", "mux")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_model():
    r = subprocess.run(["lscpu"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def proc_cpu(pid, children=False):
    """user+sys seconds of a live process (and of its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17.
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / CLK_TCK


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port():
    """A TCP port free on every address (sshd's port 22 may be taken by the host's own sshd)."""
    import socket
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class StepCpu:
    """CPU seconds per step of the SSH baseline, summed over machines (thread-safe)."""

    def __init__(self):
        self.totals = {}
        self.lock = threading.Lock()

    def add(self, step, seconds):
        with self.lock:
            self.totals[step] = self.totals.get(step, 0.0) + seconds


def run_timed(argv, env):
    """Runs argv; returns (exit code, stderr, user+sys seconds of it and its reaped children)."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                             env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace").strip()
    return p.returncode, text, ru.ru_utime + ru.ru_stime


def address(i):
    return f"127.1.{i // 250}.{i % 250 + 1}"


class Machine:
    """One machine: a sandbox root shared by its sshd and its muster agent."""

    def __init__(self, bench, i):
        self.bench = bench
        self.name = f"m{i:03d}"
        self.addr = address(i)
        self.agent = bench.env.add_agent(self.name, logLevel="warn", backoffBase=0.2,
                                         backoffCap=2)
        self.root = self.agent.root
        # As on a NixOS machine, the profiles directory exists before any deploy.
        os.makedirs(os.path.dirname(self.agent.profile), exist_ok=True)
        self.sshd_dir = os.path.join(self.root, "sshd")
        os.makedirs(self.sshd_dir)
        self.host_key = os.path.join(self.sshd_dir, "ssh_host_ed25519_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f",
                        self.host_key], check=True)
        with open(self.host_key + ".pub") as f:
            self.host_pub = " ".join(f.read().split()[:2])
        self.sshd_config = os.path.join(self.sshd_dir, "sshd_config")
        with open(self.sshd_config, "w") as f:
            f.write(f"""ListenAddress {self.addr}:{bench.ssh_port}
HostKey {self.host_key}
PidFile {self.sshd_dir}/sshd.pid
AuthorizedKeysFile {bench.authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
MaxStartups 200
LogLevel ERROR
""")
        self.sshd = None

    def start(self):
        self.sshd = Process([SSHD, "-D", "-e", "-f", self.sshd_config],
                            os.path.join(self.bench.env.root, f"sshd-{self.name}.log"))
        self.agent.start()

    def activated(self, toplevel):
        """ns timestamp of the activation that pointed current-system at toplevel, or None."""
        try:
            if os.readlink(self.agent.current) != toplevel:
                return None
            return os.lstat(self.agent.current).st_mtime_ns
        except OSError:
            return None

    def succeeded(self, toplevel):
        try:
            cur = self.agent.state_json().get("current") or {}
        except (OSError, ValueError):
            return False
        return cur.get("phase") == "succeeded" and toplevel in cur.get("manifest", "")

    def machine_cpu(self):
        total = 0.0
        for p in (self.sshd, self.agent.proc):
            if p is not None and p.alive():
                try:
                    total += proc_cpu(p.proc.pid, children=True)
                except OSError:
                    pass
        return total


class Bench:
    def __init__(self, args):
        self.args = args
        self.env = Env("sshbench")
        self.machines = []
        self.mux_dir = None
        try:
            self._setup(args)
        except BaseException:
            # Whatever was started (controller, agents, sshd) must not outlive a failed set-up.
            self.close(keep=True)
            raise

    def _setup(self, args):
        self.env.start()
        self.ssh_port = args.ssh_port or free_port()
        ssh = os.path.join(self.env.root, "ssh")
        os.makedirs(ssh)
        self.ssh_key = os.path.join(ssh, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f",
                        self.ssh_key], check=True)
        self.authorized_keys = os.path.join(ssh, "authorized_keys")
        shutil.copy(self.ssh_key + ".pub", self.authorized_keys)
        self.known_hosts = os.path.join(ssh, "known_hosts")
        # Control sockets need a short path (sun_path is 108 bytes).
        self.mux_dir = tempfile.mkdtemp(prefix="sshmux-")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        for i in range(args.machines):
            self.machines.append(Machine(self, i))
        with open(self.known_hosts, "w") as f:
            for m in self.machines:
                f.write(f"[{m.addr}]:{self.ssh_port} {m.host_pub}\n" if self.ssh_port != 22
                        else f"{m.addr} {m.host_pub}\n")
        # Exactly what a user's ssh would check: the pinned host key, batch mode, no agent.
        self.ssh_opts = ["-F", "/dev/null", "-i", self.ssh_key, "-o", "IdentitiesOnly=yes",
                         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                         "-o", f"UserKnownHostsFile={self.known_hosts}",
                         "-o", "ConnectTimeout=30", "-p", str(self.ssh_port)]
        for m in self.machines:
            m.start()
        for m in self.machines:
            wait_until(lambda: self._listening(m.addr), 30, 0.05, f"sshd of {m.name}")
        wait_until(self._all_online, 60, 0.5, "all agents online")
        self.ssh_env = nix_env()
        self.ssh_env["NIX_SSHOPTS"] = " ".join(self.ssh_opts)
        self.builds = 0

    def _listening(self, addr):
        import socket
        try:
            socket.create_connection((addr, self.ssh_port), timeout=1).close()
            return True
        except OSError:
            return False

    def _all_online(self):
        r = self.env.cli("status", "--json", check=False)
        if r.returncode != 0:
            return False
        rows = json.loads(r.stdout)
        return sum(1 for s in rows if s.get("online")) >= len(self.machines)

    def build(self, mode, run):
        self.builds += 1
        return self.env.build(f"{mode}{run}", delete=False)

    # ------------------------------------------------------------- the modes
    def ssh_deploy(self, m, toplevel, cpu, mux=False):
        """What clan/colmena run per machine: copy the closure, then set the
        profile and switch, over ssh with the pinned host key. Adds each step's
        CPU (the process and its reaped children) to cpu. With mux, both steps
        share one SSH connection (a ControlMaster, as nixos-rebuild --target-host
        keeps), whose CPU is counted too."""
        opts, env, master = self.ssh_opts, self.ssh_env, None
        if mux:
            path = os.path.join(self.mux_dir, m.name)
            opts = [*self.ssh_opts, "-o", f"ControlPath={path}"]
            env = dict(self.ssh_env, NIX_SSHOPTS=" ".join(opts))
            master = subprocess.Popen(["ssh", *opts, "-M", "-N", "-o", "ControlPersist=no",
                                       f"root@{m.addr}"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and master.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if not os.path.exists(path):
                if master.poll() is None:
                    master.kill()
                    master.wait()
                return f"{m.name}: the SSH control master did not come up"
        try:
            rc, err, t = run_timed(["nix", "copy", "--to", f"ssh-ng://root@{m.addr}", toplevel], env)
            cpu.add("copy", t)
            if rc != 0:
                return f"{m.name}: nix copy exited {rc}: {err[-500:]}"
            remote = (f"nix-env -p {m.agent.profile} --set {toplevel} && "
                      f"MUSTER_CURRENT_SYSTEM={m.agent.current} {toplevel}/bin/switch-to-configuration switch")
            rc, err, t = run_timed(["ssh", *opts, f"root@{m.addr}", remote], env)
            cpu.add("switch", t)
            if rc != 0:
                return f"{m.name}: ssh switch exited {rc}: {err[-500:]}"
            return None
        finally:
            if master is not None:
                _, _, t = run_timed(["ssh", *opts, "-O", "exit", f"root@{m.addr}"], env)
                if master.returncode is None:  # not reaped by poll() above
                    _, status, ru = os.wait4(master.pid, 0)
                    master.returncode = os.waitstatus_to_exitcode(status)
                    t += ru.ru_utime + ru.ru_stime
                cpu.add("connect", t)

    def run_ssh(self, toplevel, parallel, cpu, mux=False):
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            return [e for e in pool.map(lambda m: self.ssh_deploy(m, toplevel, cpu, mux),
                                        self.machines) if e]

    def run_muster(self, toplevel):
        c = self.env.cache
        argv = [binary("muster"), "--config", os.path.join(self.env.cli_dir, "config.json"),
                "publish", "--all", "--yes", "--substituter", c.url, "--trusted-public-key",
                c.public, toplevel]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env.cli_env())
        if r.returncode != 0:
            return [f"muster publish --all exited {r.returncode}: {r.stdout}{r.stderr}"]
        return []

    def measure(self, mode, run):
        toplevel = self.build(mode, run)
        ctl = self.env.controller.proc.pid
        timeout = self.args.timeout
        load0 = loadavg()
        machines0 = sum(m.machine_cpu() for m in self.machines)
        ctl0 = proc_cpu(ctl)
        kids0 = children_cpu()
        t0_ns = time.time_ns()
        t0 = time.monotonic()
        errors = []
        done = {}
        steps = StepCpu()

        def work():
            if mode == "muster":
                errors.extend(self.run_muster(toplevel))
            else:
                errors.extend(self.run_ssh(toplevel, 10 if mode == "colmena" else len(self.machines),
                                           steps, mux=(mode == "mux")))
            done["command"] = time.monotonic() - t0

        worker = threading.Thread(target=work)
        worker.start()
        stamps = {}
        while len(stamps) < len(self.machines) and time.monotonic() - t0 < timeout:
            for m in self.machines:
                if m.name not in stamps:
                    ts = m.activated(toplevel)
                    if ts is not None:
                        stamps[m.name] = ts
            if not worker.is_alive() and errors:
                break
            time.sleep(0.01)
        worker.join(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        if mode == "muster":
            # Confirmation and the final reports are part of muster's cost: wait
            # for every agent to record "succeeded" (its own state file, so that
            # waiting costs the controller nothing).
            pending = list(self.machines)
            while time.monotonic() - t0 < timeout:
                pending = [m for m in pending if not m.succeeded(toplevel)]
                if not pending:
                    break
                time.sleep(0.05)
            if pending:
                errors.append(f"not succeeded within {timeout} s: "
                              f"{', '.join(m.name for m in pending[:10])}")
            settled = time.monotonic() - t0
            ctl_cpu = proc_cpu(ctl) - ctl0
        else:
            settled = done.get("command")
            ctl_cpu = 0.0
        kids = children_cpu() - kids0
        machines_cpu = sum(m.machine_cpu() for m in self.machines) - machines0
        missing = [m.name for m in self.machines if m.name not in stamps]
        if missing:
            why = "after the errors above" if errors else f"within {timeout} s"
            errors.append(f"not activated {why}: {', '.join(missing[:10])}"
                          f"{' …' if len(missing) > 10 else ''}")
        if worker.is_alive():
            errors.append("the command did not return")
        last = max(stamps.values()) if stamps else None
        return {
            "mode": mode,
            "run": run,
            "machines": len(self.machines),
            "toplevel": toplevel,
            "activatedSeconds": (last - t0_ns) / 1e9 if last else None,
            "firstActivatedSeconds": (min(stamps.values()) - t0_ns) / 1e9 if stamps else None,
            "commandSeconds": done.get("command"),
            "settledSeconds": settled,
            "operatorCpuSeconds": kids + ctl_cpu,
            "cliCpuSeconds": kids,
            "controllerCpuSeconds": ctl_cpu,
            "machinesCpuSeconds": machines_cpu,
            "stepCpuSeconds": steps.totals,
            "loadavgBefore": load0,
            "loadavgAfter": loadavg(),
            "errors": errors,
        }

    def check_log(self, results):
        """Every machine appended one "<name> switch nixos" line per mode and run."""
        lines = self.env.activation_log()
        problems = []
        for r in results:
            name = os.path.basename(r["toplevel"]).split("-", 1)[1].removeprefix("muster-test-")
            want = f"{name} switch nixos"
            got = sum(1 for l in lines if l == want)
            if got != len(self.machines):
                problems.append(f"{r['mode']} run {r['run']}: {got} activations of {name} "
                                f"recorded, expected {len(self.machines)}")
        return problems

    def close(self, keep=False):
        for m in self.machines:
            if m.sshd:
                m.sshd.stop()
        self.env.close(keep=keep)
        if keep:
            print(f"ssh_vs_muster: logs and state kept in {self.env.root}", file=sys.stderr)
        if self.mux_dir:
            shutil.rmtree(self.mux_dir, ignore_errors=True)


def spread(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def summarize(results, modes):
    out = {}
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        out[mode] = {k: spread([r[k] for r in rs]) for k in
                     ("activatedSeconds", "commandSeconds", "operatorCpuSeconds",
                      "cliCpuSeconds", "controllerCpuSeconds", "machinesCpuSeconds")}
        for step in ("copy", "switch", "connect"):
            out[mode][f"{step}CpuSeconds"] = spread([r["stepCpuSeconds"].get(step) for r in rs])
    if "muster" in out:
        m = out["muster"]
        for base in SSH_MODES:
            if base in out and out[base]["activatedSeconds"] and m["activatedSeconds"]:
                out[f"{base}/muster"] = {
                    "activated": out[base]["activatedSeconds"]["median"] / m["activatedSeconds"]["median"],
                    "operatorCpu": out[base]["operatorCpuSeconds"]["median"] /
                    max(m["operatorCpuSeconds"]["median"], 1e-9),
                }
    return out


def markdown(summary, modes, n):
    def fmt(s):
        if not s:
            return "–"
        return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"
    def med(s):
        return f"{s['median']:.2f}" if s else "–"
    rows = [f"| N = {n} | activated, s | command returned, s | operator CPU, s | of which | "
            "machines CPU, s |",
            "|---|---:|---:|---:|---|---:|"]
    for mode in modes:
        s = summary[mode]
        split = (f"CLI {med(s['cliCpuSeconds'])}, controller {med(s['controllerCpuSeconds'])}"
                 if mode == "muster" else
                 f"nix copy {med(s['copyCpuSeconds'])}, ssh switch {med(s['switchCpuSeconds'])}"
                 + (f", control master {med(s['connectCpuSeconds'])}" if mode == "mux" else ""))
        rows.append(f"| {mode} | {fmt(s['activatedSeconds'])} | {fmt(s['commandSeconds'])} | "
                    f"{fmt(s['operatorCpuSeconds'])} | {split} | {fmt(s['machinesCpuSeconds'])} |")
    for base in SSH_MODES:
        k = f"{base}/muster"
        if k in summary:
            rows.append(f"| {k} (ratio of medians) | {summary[k]['activated']:.2f}× | | "
                        f"{summary[k]['operatorCpu']:.2f}× | | |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="clan,colmena,muster")
    ap.add_argument("--ssh-port", type=int, default=0,
                    help="port of every sshd (default: one free on all addresses)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run and mode")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--check", action="store_true",
                    help="fail unless every machine activated every toplevel (the smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    if not os.access(SSHD, os.X_OK):
        print(f"ssh_vs_muster: {SSHD} not found; install openssh-server (scripts/install-deps.sh)",
              file=sys.stderr)
        return 77
    if args.machines < 1 or args.machines > 250 * 250:
        print("ssh_vs_muster: --machines must be between 1 and 62500", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in (*SSH_MODES, "muster")]
    if bad:
        print(f"ssh_vs_muster: unknown mode(s) {bad}; use {', '.join(SSH_MODES)}, muster",
              file=sys.stderr)
        return 2
    # The operator's ssh and nix processes are counted as they are reaped; a
    # killed run must not leave sshd/agents behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    bench = None
    failed = True
    try:
        bench = Bench(args)
        setup = time.monotonic() - started
        print(f"ssh_vs_muster: {args.machines} machines up in {setup:.1f} s "
              f"(sshd on {address(0)}…{address(args.machines - 1)}:{bench.ssh_port}, agents online)",
              file=sys.stderr)
        results = []
        for run in range(args.runs):
            # Rotate the order so that drift in the machine's load hits every mode alike.
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for mode in order:
                r = bench.measure(mode, run)
                results.append(r)
                print(f"  run {run} {mode:8s} activated {r['activatedSeconds']} s, "
                      f"command {r['commandSeconds']} s, operator CPU {r['operatorCpuSeconds']:.2f} s, "
                      f"machines CPU {r['machinesCpuSeconds']:.2f} s, load {r['loadavgAfter'][0]}"
                      f"{', ERRORS: ' + '; '.join(r['errors']) if r['errors'] else ''}",
                      file=sys.stderr)
        problems = [e for r in results for e in r["errors"]] + bench.check_log(results)
        summary = summarize(results, modes)
        doc = {
            "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "loadavg": loadavg()},
            "binaries": os.path.realpath(binary("muster-controller")),
            "machines": args.machines,
            "runs": results,
            "summary": summary,
            "problems": problems,
        }
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
        print(markdown(summary, modes, args.machines))
        for p in problems:
            print(f"ssh_vs_muster: {p}", file=sys.stderr)
        failed = bool(problems)
        if args.check and failed:
            return 1
        return 0
    finally:
        if bench is not None:
            bench.close(keep=args.keep or failed)


if __name__ == "__main__":
    sys.exit(main())
