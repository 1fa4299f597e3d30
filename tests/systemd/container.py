"""A booted systemd for muster's tests: a Debian 12 root made with mmdebstrap,
booted with systemd-nspawn on a machine whose PID 1 need not be systemd.

The root is made once and cached under the build tree, keyed on its package
list and the apt sources (MUSTER_SYSTEMD_ROOT_CACHE overrides the place); each
container boots an overlay of it (its own upper directory, kept across reboots
of that container) and shares the host's network namespace, so an agent inside
reaches a controller on the host's loopback.

What nspawn needs here (see issue 15): --register=no --keep-unit (no host
systemd to register with), a cgroup subtree of its own (made here, the launching
process moved into it) and SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 for a clean
cgroup v2 tree inside. Commands run inside with nsenter into the container's
namespaces. `systemctl reboot` inside makes nspawn exit 133; boot() boots the
same root again.
"""
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = "bookworm"
# What the agent and the controller from the .deb need at run time, plus a
# booting systemd and Debian's nix.
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "nix-bin", "nix-setup-systemd",
    "libssl3", "libsodium23", "libsqlite3-0", "libpq5", "libspdlog1.10", "libfmt9", "adduser",
]
# Test fixture, not muster: at boot, /run/booted-system and /run/current-system
# point at the system profile, as NixOS stage 2 does (nothing when there is none).
BOOT_UNIT = """[Unit]
Description=muster test fixture: link the booted system like NixOS stage 2
DefaultDependencies=no
After=local-fs.target
Before=muster-agent.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'p=$(readlink -e /nix/var/nix/profiles/system) || exit 0; ln -sfn "$p" /run/booted-system; ln -sfn "$p" /run/current-system'

[Install]
WantedBy=multi-user.target
"""


class CannotBoot(Exception):
    """nspawn cannot boot a container on this machine (the tests skip)."""


def apt_sources():
    """The apt sources this machine is configured with, as mmdebstrap mirror args."""
    files = []
    if os.path.isfile("/etc/apt/sources.list") and os.path.getsize("/etc/apt/sources.list") > 0:
        files.append("/etc/apt/sources.list")
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    return files


def cache_dir():
    d = os.environ.get("MUSTER_SYSTEMD_ROOT_CACHE")
    if d:
        return d
    build = os.environ.get("MUSTER_BUILD_DIR") or os.path.join(HERE, "..", "..", "build", "dev")
    return os.path.join(build, "systemd-root")


def root_key():
    h = hashlib.sha256()
    h.update(SUITE.encode())
    h.update(" ".join(PACKAGES).encode())
    h.update(BOOT_UNIT.encode())
    for f in apt_sources():
        with open(f, "rb") as inp:
            h.update(inp.read())
    return h.hexdigest()[:16]


def check_host():
    """Raises CannotBoot saying what is missing."""
    if os.geteuid() != 0:
        raise CannotBoot("the systemd tests boot containers and need root")
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} is not installed (scripts/install-deps.sh installs it)")
    if not apt_sources():
        raise CannotBoot("no apt sources in /etc/apt to make the container root from")


def ensure_root(log=print):
    """The cached root directory (made on first use; about a minute)."""
    check_host()
    base = os.path.join(cache_dir(), root_key())
    os.makedirs(base, exist_ok=True)
    root = os.path.join(base, "root")
    stamp = os.path.join(base, "complete")
    with open(os.path.join(base, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test may be making it
        if os.path.exists(stamp):
            return root
        shutil.rmtree(root, ignore_errors=True)
        tar = os.path.join(base, "root.tar")
        t0 = time.monotonic()
        argv = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, tar]
        argv += apt_sources()
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-4000:]}")
        os.makedirs(root)
        subprocess.run(["tar", "-C", root, "-xf", tar], check=True)
        os.unlink(tar)
        unit = os.path.join(root, "etc/systemd/system/muster-test-boot.service")
        with open(unit, "w") as f:
            f.write(BOOT_UNIT)
        wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
        os.makedirs(wants, exist_ok=True)
        os.symlink("/etc/systemd/system/muster-test-boot.service",
                   os.path.join(wants, "muster-test-boot.service"))
        # No console login prompt to wait for; no network tools wanted.
        for f in glob.glob(os.path.join(root, "etc/systemd/system/getty.target.wants/*")):
            os.unlink(f)
        with open(stamp, "w") as f:
            f.write(f"{time.monotonic() - t0:.1f} s\n")
        log(f"container root {root} made in {time.monotonic() - t0:.1f} s")
        return root


class Container:
    """One booted container on an overlay of the cached root."""

    def __init__(self, lower, workdir, binds_ro=()):
        self.lower = lower
        self.workdir = workdir
        self.binds_ro = list(binds_ro)
        self.merged = os.path.join(workdir, "merged")
        self.proc = None
        self.leader = None
        self.boots = 0
        self.log_path = os.path.join(workdir, "nspawn.log")
        self.cgroups = []
        for d in ("upper", "work", "merged"):
            os.makedirs(os.path.join(workdir, d), exist_ok=True)
        opts = f"lowerdir={lower},upperdir={workdir}/upper,workdir={workdir}/work"
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.merged],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CannotBoot(f"cannot mount an overlay root: {r.stderr.strip()}")
        self._make_cgroups()

    def _make_cgroups(self):
        name = "muster-test-" + uuid.uuid4().hex[:8]
        if os.path.isdir("/sys/fs/cgroup/unified"):  # hybrid: name=systemd v1 + v2
            parents = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # pure v2
            parents = ["/sys/fs/cgroup"]
        else:
            raise CannotBoot("no cgroup v2 hierarchy (/sys/fs/cgroup/unified or /sys/fs/cgroup)")
        for p in parents:
            if not os.path.isdir(p):
                raise CannotBoot(f"{p} is missing: nspawn needs a name=systemd or v2 cgroup tree")
            d = os.path.join(p, name)
            os.makedirs(d, exist_ok=True)
            self.cgroups.append(d)

    def _enter_cgroups(self):  # in the child, before exec
        for d in self.cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def boot(self, timeout=60):
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", self.merged,
                "--machine=muster-test", "-b"]
        for b in self.binds_ro:
            argv.append(f"--bind-ro={b}")
        self.boots += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== boot {self.boots} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=env, preexec_fn=self._enter_cgroups)
        log.close()
        deadline = time.monotonic() + timeout
        self.leader = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited {self.proc.returncode} while booting:\n"
                                 + self.log_tail())
            if self.leader is None:
                try:
                    with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                        kids = f.read().split()
                    self.leader = int(kids[0]) if kids else None
                except OSError:
                    pass
            if self.leader is not None:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    return time.monotonic() - (deadline - timeout)
            time.sleep(0.1)
        raise CannotBoot(f"the container did not reach a running system in {timeout} s:\n"
                         + self.log_tail())

    def log_tail(self, n=3000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def run(self, argv, check=True, timeout=120, input=None):
        """Runs argv inside the container as root."""
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--"] + argv
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                           env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(argv)} exited {r.returncode}:\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def write(self, path, text, mode=0o644):
        p = self.merged + path
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)

    def read(self, path):
        try:
            with open(self.merged + path, errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def wait_exit(self, timeout):
        """nspawn's exit status (133 after a reboot inside), or None on timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self):
        if self.proc is not None and self.proc.poll() is None:
            self.run(["systemctl", "poweroff"], check=False, timeout=10)
            if self.wait_exit(20) is None:
                self.proc.kill()  # our own nspawn process only
                self.proc.wait()
        self.proc = None

    def close(self):
        self.shutdown()
        subprocess.run(["umount", self.merged], capture_output=True)
        for d in self.cgroups:  # nspawn leaves payload/, supervisor/ … below it
            for sub, _dirs, _files in os.walk(d, topdown=False):
                try:
                    os.rmdir(sub)
                except OSError:
                    pass


if __name__ == "__main__":
    # python3 container.py prepare: make (or find) the cached root; 77 = cannot here.
    import sys
    try:
        print("container root ready:", ensure_root())
    except CannotBoot as e:
        print(f"SKIP: cannot make a systemd container here: {e}")
        sys.exit(77)
