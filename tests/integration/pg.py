"""A throw-away PostgreSQL server for integration tests.

PgServer starts Debian's PostgreSQL in a temporary directory, listening on a
Unix socket only, as nobody when the tests run as root (PostgreSQL refuses to
run as root). fsync is off: the tests check what muster does, not the disk.
initdb runs once per machine into a template directory that later servers copy.
"""
import glob
import os
import shutil
import subprocess
import tempfile
import uuid

NOBODY = 65534


def bin_dir():
    """The directory with initdb and pg_ctl, or None."""
    env = os.environ.get("MUSTER_PG_BIN")
    if env:
        return env
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                  key=lambda p: int(p.split("/")[4]))
    if dirs:
        return os.path.dirname(dirs[-1])
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found else None


def _as_server_user(argv):
    if os.geteuid() == 0:
        return ["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--"] + argv
    return argv


class PgServer:
    def __init__(self, durable=False):
        """durable: fsync on (benchmarks measure what a production server does)."""
        self.durable = durable
        self.bin = bin_dir()
        if not self.bin:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found; install "
                                    "Debian's 'postgresql' package or set MUSTER_PG_BIN")
        self.dir = tempfile.mkdtemp(prefix="muster-pg-")
        if os.geteuid() == 0:
            os.chown(self.dir, NOBODY, NOBODY)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.running = False

    def _run(self, *argv):
        r = subprocess.run(_as_server_user(list(argv)), capture_output=True, text=True,
                           timeout=120, cwd="/")
        if r.returncode != 0:
            log = open(self.log, errors="replace").read() if os.path.exists(self.log) else ""
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr}\n{log}")
        return r

    def start(self):
        if not os.path.exists(self.data):
            version = os.path.basename(os.path.dirname(self.bin))
            template = os.path.join(tempfile.gettempdir(),
                                    f"muster-pg-template-{version}-{os.geteuid()}")
            if not os.path.exists(os.path.join(template, "PG_VERSION")):
                fresh = os.path.join(self.dir, "template")
                self._run(f"{self.bin}/initdb", "-D", fresh, "-U", "muster", "--auth=trust",
                          "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
                try:
                    os.rename(fresh, template)
                except OSError:  # another test made it first
                    shutil.rmtree(fresh, ignore_errors=True)
            self._run("/bin/cp", "-a", template, self.data)
        fast = "" if self.durable else "-c fsync=off -c full_page_writes=off "
        self._run(f"{self.bin}/pg_ctl", "-D", self.data, "-w", "-t", "60", "-s", "-l", self.log,
                  "-o", f"-k {self.dir} -c listen_addresses= {fast}-c max_connections=200",
                  "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        if self.running:
            self._run(f"{self.bin}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-s", "stop")
            self.running = False

    def restart(self):
        self.stop()
        self.start()

    def psql(self, db, sql):
        """Runs sql in db; returns its unaligned output."""
        return self._run(f"{self.bin}/psql", "-h", self.dir, "-U", "muster", "-d", db, "-At",
                         "-v", "ON_ERROR_STOP=1", "-c", sql).stdout

    def new_database(self):
        name = "m" + uuid.uuid4().hex[:12]
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name

    def uri(self, db):
        return f"postgresql://muster@/{db}?host={self.dir}"

    def close(self):
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
