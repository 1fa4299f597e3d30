"""A closure of 1 GiB through the controller (issue 11): uploaded by the CLI
and realised by an agent that has no substituter but the controller, with the
controller's and the agent's memory bounded by chunk sizes and windows, never
by the closure's size. The figures are printed for docs/BENCHMARKS.md; only the
bounds are asserted (nothing here is timed)."""
import os
import time

from harness import EnvTest

GIB = 1 << 30
# Generous against the windows (CLI 2 x 4 x 2 MiB in flight, controller one
# chunk per upload plus verifiers, agent <= 16 requests x 4 chunks of 1 MiB),
# far below the 1 GiB that buffering one NAR whole would take.
MAX_RSS_MIB = 160


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


class LargeClosureTest(EnvTest):
    top = None

    def _cleanup(self):
        super()._cleanup()  # the agent's profiles (GC roots) go with its sandbox
        if self.top:
            self.env.delete_local(self.top)  # a GiB of this test's own paths

    def test_one_gib_uploads_and_realises_with_bounded_memory(self):
        env = self.env
        env.start()
        agent = env.add_agent("m1", realiseTimeout=1800).start()
        key = os.path.join(env.cli_dir, "cache.key")
        env.cli("key", "generate", "--cache", "--out", key)
        top = self.top = env.build("large", push=False, delete=False, payload=GIB)
        payload = os.path.realpath(os.path.join(top, "payload"))
        self.assertEqual(os.path.getsize(os.path.join(payload, "data")), GIB)

        t0 = time.monotonic()
        env.cli("cache", "push", top, "--cache-key", key, timeout=1800)
        t1 = time.monotonic()
        env.delete_local(top)
        self.assertFalse(os.path.exists(payload))
        r = env.cli("publish", "m1", top, "--cache-key", key)
        gen = int(r.stdout.split("generation ")[1].split(":")[0])
        s = env.wait_phase("m1", gen, ["succeeded", "failed"], timeout=1800)
        t2 = time.monotonic()
        self.assertEqual(s["phase"], "succeeded", s["detail"])
        self.assertEqual(agent.current_system(), top)
        # nix checked the NAR hash while unpacking; the bytes are all there.
        self.assertEqual(os.path.getsize(os.path.join(payload, "data")), GIB)

        ctl = peak_rss_mib(env.controller.proc.pid)
        agt = peak_rss_mib(agent.proc.proc.pid)
        print(f"\n1 GiB closure: upload {t1 - t0:.1f} s, publish to succeeded {t2 - t1:.1f} s, "
              f"peak RSS controller {ctl:.1f} MiB, agent {agt:.1f} MiB")
        self.assertLess(ctl, MAX_RSS_MIB, "controller peak RSS grows with the closure")
        self.assertLess(agt, MAX_RSS_MIB, "agent peak RSS grows with the closure")
