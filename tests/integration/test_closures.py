"""Closures through the controller (issue 11): the controller is the fleet's
binary cache. The operator's CLI uploads, agents fetch over their one
authenticated connection, nix verifies everything against the operator's
cache key."""
import base64
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

from harness import HERE, CuttableProxy, EnvTest, Process, binary, nix_env, wait_until
from rawclient import Identity, WsConn


class ClosuresBase(EnvTest):
    """A controller, a CLI with a cache key, helpers; no tests of its own."""

    def setUp(self):
        super().setUp()
        self.env.start()
        self.key = os.path.join(self.env.cli_dir, "cache.key")
        pub = self.env.cli("key", "generate", "--cache", "--name", "fleet-test-1",
                           "--out", self.key).stdout.strip()
        self.assertTrue(pub.startswith("fleet-test-1:"), pub)

    def push(self, *paths, check=True):
        return self.env.cli("cache", "push", *paths, "--cache-key", self.key, check=check)

    def publish(self, machine, top, *extra, check=True):
        r = self.env.cli("publish", machine, top, "--cache-key", self.key, *extra, check=check)
        return int(r.stdout.split("generation ")[1].split(":")[0]) if check else r

    def closure(self, path):
        return subprocess.run(["nix-store", "-q", "--requisites", path], capture_output=True,
                              text=True, env=nix_env(), check=True).stdout.split()

    def compression(self, path):
        with open(self.narinfo(path)) as f:
            return [l.split(": ", 1)[1] for l in f.read().splitlines()
                    if l.startswith("Compression: ")][0]

    def cache_file(self, pattern):
        files = glob.glob(os.path.join(self.env.ctl_dir, "cache", pattern))
        self.assertEqual(len(files), 1, pattern)
        return files[0]

    def narinfo(self, path):
        return self.cache_file(os.path.basename(path)[:32] + ".narinfo")



class ClosuresTest(ClosuresBase):
    def test_machine_with_only_the_controller_realises_a_multi_path_closure(self):
        env = self.env
        a = env.add_agent("m1").start()
        top = env.build("via-controller", push=False, delete=False, payload=3 << 20)
        paths = self.closure(top)
        self.assertEqual(len(paths), 3, paths)  # toplevel, kernel, payload
        self.push(top)
        env.delete_local(top)
        for p in paths:
            self.assertFalse(os.path.exists(p), p)
        # Random data does not compress: sent and stored as it is; the rest is zstd.
        for p in paths:
            want = "none" if "payload" in p else "zstd"
            self.assertEqual(self.compression(p), want, p)
        # No substituter named: the manifest names the controller ("muster:")
        # and the cache key, and the agent has no other cache.
        gen = self.publish("m1", top)
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(a.current_system(), top)
        for p in paths:
            self.assertTrue(os.path.exists(p), p)
        def logged():
            out = env.cli("logs", "m1", "--generation", str(gen), "--json").stdout
            text = "\n".join(json.loads(l)["line"] for l in out.splitlines() if l.strip())
            return text if "copying path" in text else None
        # Log lines are stored in batches, and may land just after the final report.
        text = wait_until(logged, 10, interval=0.2, what="the realise's log lines")
        self.assertIn("http://127.0.0.1:", text)  # the loopback substituter, nothing else
        st = json.loads(env.cli("cache", "status", "--json").stdout)
        self.assertEqual(st["paths"], 3)
        self.assertEqual(st["gcPaths"], 0)  # all needed by m1

    def test_publish_uploads_what_the_controller_lacks(self):
        env = self.env
        top = env.build("publish-uploads", push=False, delete=False, payload=1 << 20)
        env.add_agent("m1")  # registered, offline: the upload does not need it
        self.publish("m1", top)
        for p in self.closure(top):
            self.assertTrue(os.path.exists(self.narinfo(p)), p)
        # A second publish uploads nothing: the controller has every path.
        r = self.publish("m1", top, "--force", check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("resuming", r.stderr)

    def only_in_the_controller(self, name, **argstr):
        """Starts agent m1; builds a toplevel with 1 MiB of payload, uploads it, deletes it here."""
        self.env.add_agent("m1").start()
        top = self.env.build(name, push=False, delete=False, payload=1 << 20, **argstr)
        self.push(top)
        self.env.delete_local(top)
        return top

    def assert_refused_by_nix(self, top, reason):
        """Publishing top to m1 fails with reason in the detail; nothing activates."""
        gen = self.publish("m1", top)
        s = self.env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=180)
        self.assertEqual(s["phase"], "failed", s["detail"])
        self.assertIn(reason, s["detail"])
        self.assertEqual(self.env.activation_log(), [])

    def test_altered_narinfo_is_refused_by_nix(self):
        top = self.only_in_the_controller("altered-info")
        # A compromised controller claims another size: the signature no longer matches.
        info = self.narinfo(top)
        with open(info) as f:
            text = f.read()
        size = [l for l in text.splitlines() if l.startswith("NarSize: ")][0]
        with open(info, "w") as f:
            f.write(text.replace(size, "NarSize: " + str(int(size.split()[1]) + 1)))
        self.assert_refused_by_nix(top, "not signed by any of the manifest's trusted public keys")

    def test_altered_nar_is_refused_by_nix(self):
        top = self.only_in_the_controller("altered-nar", payloadKind="text")
        # Serve the kernel's NAR under the payload's name: valid zstd, wrong content.
        payload = [p for p in self.closure_of_cache(top) if "payload" in p][0]
        kernel = [p for p in self.closure_of_cache(top) if "kernel" in p][0]
        victim = self.cache_file("nar/" + os.path.basename(payload)[:32] + "-*.nar.zst")
        donor = self.cache_file("nar/" + os.path.basename(kernel)[:32] + "-*.nar.zst")
        with open(donor, "rb") as f, open(victim, "wb") as g:
            g.write(f.read())
        self.assert_refused_by_nix(top, "hash mismatch importing path")

    def test_altered_uncompressed_nar_is_refused_by_nix(self):
        top = self.only_in_the_controller("altered-raw")
        payload = [p for p in self.closure_of_cache(top) if "payload" in p][0]
        self.assertEqual(self.compression(payload), "none")
        # One bit of the random data flipped: still a well-formed NAR of the right size.
        victim = self.cache_file("nar/" + os.path.basename(payload)[:32] + "-*.nar")
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 1]))
        self.assert_refused_by_nix(top, "hash mismatch importing path")

    def test_compressible_closure_is_stored_zstd_and_realised(self):
        env = self.env
        a = env.add_agent("m1").start()
        top = env.build("text-payload", push=False, delete=False, payload=2 << 20,
                        payloadKind="text")
        self.push(top)
        payload = [p for p in self.closure(top) if "payload" in p][0]
        self.assertEqual(self.compression(payload), "zstd")
        nar = self.cache_file("nar/" + os.path.basename(payload)[:32] + "-*.nar.zst")
        self.assertLess(os.path.getsize(nar), (3 << 20) // 2)  # hex digits: zstd halves them
        env.delete_local(top)
        gen = self.publish("m1", top)
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(a.current_system(), top)

    def closure_of_cache(self, top):
        """Store paths the cache holds for top's closure (from its narinfos)."""
        out, todo = [], [os.path.basename(top)]
        while todo:
            b = todo.pop()
            if any(o.endswith(b) for o in out):
                continue
            out.append("/nix/store/" + b)
            with open(self.narinfo(b)) as f:
                for line in f:
                    if line.startswith("References:"):
                        todo += line.split()[1:]
        return out

    def test_another_machines_path_is_404(self):
        env = self.env
        env.add_agent("m1")
        ident = Identity(env.root, "m2")
        env.cli("machine", "add", "m2", "--key", ident.public)
        top1 = env.build("for-m1", push=False, delete=False)
        top2 = env.build("for-m2", push=False, delete=False)
        self.publish("m1", top1)
        self.publish("m2", top2)

        c = WsConn(env.port, ident)
        self.addCleanup(c.close)
        c.send_frame(json.dumps({"v": 1, "type": "hello", "body": {"machine": "m2", "agentVersion": "raw"}}))

        def fetch(name, fid):
            c.send_frame(json.dumps({"v": 1, "type": "fetch",
                                     "body": {"id": fid, "name": name, "offset": 0, "length": 65536}}))
            for _ in range(20):
                op, data = c.recv_frame()
                if op != 0x2:  # fetched comes as a binary frame: header length, JSON, bytes
                    continue
                n = int.from_bytes(data[:4], "big")
                m = json.loads(data[4:4 + n])
                if m["type"] == "fetched" and m["body"]["id"] == fid:
                    m["body"]["payload"] = data[4 + n:]
                    return m["body"]
            raise AssertionError("no answer to fetch " + name)

        own = fetch(os.path.basename(top2)[:32] + ".narinfo", 1)
        self.assertEqual(own["status"], 200, own)
        self.assertIn(b"StorePath: " + top2.encode(), own["payload"])
        other = fetch(os.path.basename(top1)[:32] + ".narinfo", 2)
        self.assertEqual(other["status"], 404, other)
        self.assertEqual(other["payload"], b"")
        info = fetch("nix-cache-info", 3)
        self.assertEqual(info["status"], 200)
        # The NAR of m1's toplevel, by its exact name, is refused as well.
        with open(self.narinfo(top1)) as f:
            url = [l.split(": ", 1)[1] for l in f.read().splitlines() if l.startswith("URL: ")][0]
        self.assertEqual(fetch(url, 4)["status"], 404)

    def test_cut_upload_resumes_and_ends_correct(self):
        env = self.env
        a = env.add_agent("m1").start()
        top = env.build("resumed", push=False, delete=False, payload=48 << 20)
        payload = [p for p in self.closure(top) if "payload" in p][0]
        staged = os.path.join(env.ctl_dir, "cache", "staging")
        cli = Process([binary("muster"), "--config", os.path.join(env.cli_dir, "config.json"),
                       "cache", "push", top, "--cache-key", self.key],
                      os.path.join(env.root, "push1.log"), env=env.cli_env())

        def staged_bytes():
            files = glob.glob(os.path.join(staged, os.path.basename(payload)[:32] + "-*"))
            return os.path.getsize(files[0]) if files else 0
        # Cut it (SIGKILL: no goodbye) once a few chunks of the payload are in.
        wait_until(lambda: staged_bytes() >= 4 << 20, 120, interval=0.005, what="part of the upload")
        cli.proc.send_signal(signal.SIGSTOP)
        cut_at = staged_bytes()
        cli.kill()
        self.assertLess(cut_at, 48 << 20)
        self.assertFalse(os.path.exists(self.narinfo_path(payload)))
        r = self.push(top)
        self.assertIn("resuming the upload of " + payload, r.stderr)
        self.assertEqual(glob.glob(os.path.join(staged, "*")), [])
        env.delete_local(top)
        gen = self.publish("m1", top)
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=180)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        with open(os.path.join(payload, "data"), "rb") as f:
            self.assertEqual(len(f.read()), 48 << 20)

    def narinfo_path(self, path):
        return os.path.join(self.env.ctl_dir, "cache", os.path.basename(path)[:32] + ".narinfo")

    def test_bad_uploads_are_refused_with_nothing_half_written(self):
        env = self.env
        top = env.build("bad-upload", push=False, delete=False)
        info = json.loads(subprocess.run(["nix", "path-info", "--json", top], capture_output=True,
                                         text=True, env=nix_env(), check=True).stdout)[0]
        # A truncated upload (half a zstd frame) is refused at commit.
        req = {"path": top, "narHash": info["narHash"], "narSize": info["narSize"]}
        out = self.raw_operator([
            ("cache.upload", dict(req, offset=0, data="KLUv/QBYAAA=")),  # zstd magic, then nothing
            ("cache.commit", dict(req, references=info["references"], sigs=["x:eA=="])),
            ("cache.upload", dict(req, offset=0, data="AAAA" * 3000, narSize=1)),  # oversized
            ("cache.missing", {"paths": [{"path": top, "narHash": info["narHash"]}]}),
            # Uncompressed: the right size, other bytes (NarHash differs) …
            ("cache.upload", dict(req, offset=0, compression="none",
                                  data=base64.b64encode(b"x" * info["narSize"]).decode())),
            ("cache.commit", dict(req, references=info["references"], sigs=["x:eA=="],
                                  compression="none")),
            # … one byte more than narSize, an encoding the controller does not store.
            ("cache.upload", dict(req, offset=0, compression="none",
                                  data=base64.b64encode(b"x" * (info["narSize"] + 1)).decode())),
            ("cache.upload", dict(req, offset=0, compression="xz", data="AAAA")),
        ])
        self.assertFalse(out[1]["ok"])
        self.assertIn("nothing was added", out[1]["error"])
        self.assertFalse(out[2]["ok"])
        self.assertIn("larger than a compressed NAR", out[2]["error"])
        self.assertEqual(out[3]["result"]["missing"],
                         [{"path": top, "offset": 0, "compression": "zstd"}])
        self.assertTrue(out[4]["ok"], out[4])
        self.assertFalse(out[5]["ok"])
        self.assertIn("has NAR hash", out[5]["error"])
        self.assertIn("nothing was added", out[5]["error"])
        self.assertFalse(out[6]["ok"])
        self.assertIn("larger than an uncompressed NAR", out[6]["error"])
        self.assertFalse(out[7]["ok"])
        self.assertIn("use zstd or none", out[7]["error"])
        self.assertEqual(glob.glob(os.path.join(env.ctl_dir, "cache", "*.narinfo")), [])
        self.assertEqual(glob.glob(os.path.join(env.ctl_dir, "cache", "staging", "*")), [])

    def raw_operator(self, calls):
        """Sends requests over the operator connection as a hostile CLI would."""
        ident = Identity(self.env.root, "rawop")
        subprocess.run([binary("muster-controller"), "operator", "add", "rawop", "--key",
                        ident.public, "--state-dir", self.env.ctl_dir], check=True,
                       capture_output=True)
        def connect():
            c = WsConn(self.env.port, ident, path="/v1/operator")
            return c
        c = wait_until(lambda: self._try(connect), 10, what="operator rawop admitted")
        self.addCleanup(c.close)
        out = []
        for i, (method, params) in enumerate(calls, 1):
            c.send_frame(json.dumps({"v": 1, "type": "request",
                                     "body": {"id": i, "method": method, "params": params}}))
            while True:
                op, data = c.recv_frame()
                if op == 0x1:
                    m = json.loads(data)
                    if m["type"] == "response" and m["body"]["id"] == i:
                        out.append(m["body"])
                        break
        return out

    @staticmethod
    def _try(f):
        try:
            c = f()
            if "101" in c.status_line:
                return c
            c.close()
        except (OSError, ConnectionError):
            pass
        return None


class ClosuresFullDiskTest(ClosuresBase):
    """The controller's cache on an 8 MiB tmpfs (needs root to mount it)."""

    def setUp(self):
        EnvTest.setUp(self)
        env = self.env
        env.init_controller()
        self.cache_dir = os.path.join(env.ctl_dir, "cache")
        os.makedirs(self.cache_dir, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0750", "tmpfs",
                            self.cache_dir], capture_output=True, text=True)
        if r.returncode != 0:
            self.skipTest("cannot mount a tmpfs here: " + r.stderr.strip())
        # Lazily: the controller may still hold the directory when this runs.
        self.addCleanup(subprocess.run, ["umount", "-l", self.cache_dir], capture_output=True)
        env.start_controller()
        self.key = os.path.join(env.cli_dir, "cache.key")
        env.cli("key", "generate", "--cache", "--name", "fleet-test-1", "--out", self.key)

    def test_full_disk_refuses_the_upload_and_the_cache_stays_usable(self):
        env = self.env
        a = env.add_agent("m1").start()
        first = env.build("before-full", push=False, delete=False, payload=1 << 20)
        self.push(first)
        big = env.build("fills-disk", push=False, delete=False, payload=16 << 20)
        r = self.push(big, check=False)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("disk is full", r.stderr)
        self.assertIn("nothing was added", r.stderr)
        big_payload = [p for p in self.closure(big) if "payload" in p][0]
        self.assertFalse(os.path.exists(self.narinfo_path(big_payload)))
        # The partial upload gave its room back; nothing half-written is visible.
        self.assertEqual(glob.glob(os.path.join(self.cache_dir, "staging", "*")), [])
        st = json.loads(env.cli("cache", "status", "--json").stdout)
        self.assertEqual(st["stagedBytes"], 0, st)
        # Later uploads and fetches work: what was there before, and something new.
        later = env.build("after-full", push=False, delete=False, payload=1 << 20)
        self.push(later)
        for top in (first, later):
            env.delete_local(top)
            gen = self.publish("m1", top)
            s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=120)
            self.assertEqual(s["phase"], "succeeded", s["detail"])
            self.assertEqual(a.current_system(), top)
        env.delete_local(big)

    def narinfo_path(self, path):
        return os.path.join(self.cache_dir, os.path.basename(path)[:32] + ".narinfo")


class ClosuresFlowTest(ClosuresBase):
    def test_flake_publish_goes_through_the_controller(self):
        env = self.env
        a = env.add_agent("n0")  # started once the closure exists only on the controller
        flake = os.path.join(env.root, "infra")
        os.makedirs(flake)
        shutil.copy(os.path.join(HERE, "toplevel.nix"), os.path.join(flake, "toplevel.nix"))
        system = subprocess.run(["nix", "eval", "--raw", "--impure", "--expr", "builtins.currentSystem"],
                                capture_output=True, text=True, env=nix_env(), check=True).stdout
        with open(os.path.join(flake, "flake.nix"), "w") as f:
            f.write(f"""{{
  outputs = {{ self }}: {{
    nixosConfigurations.n0.config.system.build.toplevel = import ./toplevel.nix {{
      name = "flake-via-controller"; system = "{system}"; log = "{env.root}/activation.log";
      salt = "{env.salt}"; payload = "1048576";
    }};
  }};
}}
""")
        r = env.cli("publish", "--flake", f"path:{flake}#n0", "--cache-key", self.key, check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        top = re.search(r"\[n0\] built (/nix/store/\S+)", r.stderr).group(1)
        gen = int(re.search(r"generation (\d+)", r.stdout).group(1))
        self.assertTrue(os.path.exists(self.narinfo(top)))
        env.delete_local(top)
        self.assertFalse(os.path.exists(top))
        a.start()
        s = env.wait_phase("n0", gen, ["succeeded", "failed"], timeout=120)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(a.current_system(), top)

    def test_connection_lost_mid_nar_resumes_where_it_was(self):
        env = self.env
        cut = os.path.join(env.root, "cut-link")
        proxy = CuttableProxy(env.port, cut)
        self.addCleanup(proxy.close)
        a = env.add_agent("m1", controllers=[env.url(proxy.port)]).start()
        a.wait_connected()
        top = env.build("mid-nar", push=False, delete=False, payload=64 << 20)
        payload = [p for p in self.closure(top) if "payload" in p][0]
        self.push(top)
        env.delete_local(top)
        gen = self.publish("m1", top)
        # Cut the agent's only connection while nix is downloading the payload's NAR.
        a.proc.wait_log(r"copying path '" + re.escape(payload), timeout=120)
        losses = a.proc.text().count("connection lost")  # the proxy also drops idle links
        open(cut, "w").close()
        wait_until(lambda: a.proc.text().count("connection lost") > losses, 60,
                   interval=0.02, what="the agent's connection cut")
        os.unlink(cut)
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=180)
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        # The request waited for the new connection and continued from its
        # offset (nix 2.8 cannot retry a NAR it has begun to unpack).
        self.assertIn("1 request(s) resume when it is back", a.proc.text())
        self.assertNotIn("partial file", a.proc.text())
        with open(os.path.join(payload, "data"), "rb") as f:
            self.assertEqual(len(f.read()), 64 << 20)
