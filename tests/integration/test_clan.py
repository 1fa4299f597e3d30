"""`muster publish --clan` against a flake with the shape of a clan flake.

The fixture has clanInternals.inventoryClass.inventorySerialization.machines,
nixosConfigurations with fake toplevels and the clan options muster reads
(requireExplicitUpdate, the secret store and its directory), and public values
under vars/per-machine/<m>/muster-agent/. A fake `clan` on PATH writes the
`clan vars upload --directory` layout of each backend. Agents use keys given by
file (as the clan service's generator provides them), and the controller learns
them from a roster file signed with `muster roster sign --clan`: no
`machine add`.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import time
import unittest

from harness import HERE, EnvTest, binary, nix_env, wait_until

FAKE_CLAN = os.path.join(HERE, "clan", "fake-clan")

# name: (tags, backend, requireExplicitUpdate)
MACHINES = {
    "web1": (["web", "eu"], "sops", False),
    "pw1": (["web", "eu"], "password-store", False),
    "age1": (["web", "eu"], "age", False),
    "web2": (["web", "us"], "sops", False),
    "laptop": (["web", "eu"], "sops", True),
}


def read(path):
    with open(path) as f:
        return f.read()


def tmpfs_mounts():
    with open("/proc/mounts") as f:
        return [l.split()[1] for l in f if l.split()[2] == "tmpfs"]


class ClanTest(EnvTest):
    def make_clan(self, env):
        """The fixture flake, agents with provided keys, a signed roster."""
        clan = os.path.join(env.root, "clan")
        os.makedirs(clan)
        shutil.copy(os.path.join(HERE, "toplevel.nix"), os.path.join(clan, "toplevel.nix"))
        system = subprocess.run(["nix", "eval", "--raw", "--impure", "--expr",
                                 "builtins.currentSystem"], capture_output=True, text=True,
                                env=nix_env(), check=True).stdout
        keys = os.path.join(env.root, "keys")
        os.makedirs(keys)
        inventory, configs, fake, self.pubs, self.keys, self.stores = {}, [], {}, {}, {}, {}
        self.created_at = int(time.time()) - 60
        for name, (tags, backend, explicit) in MACHINES.items():
            key = os.path.join(keys, name)
            pub = subprocess.run([binary("muster"), "--key", key, "key", "generate"],
                                 capture_output=True, text=True, check=True).stdout.strip()
            value = os.path.join(clan, "vars", "per-machine", name, "muster-agent", "key.pub")
            os.makedirs(value)
            with open(os.path.join(value, "value"), "w") as f:
                f.write(pub)
            store_dir = os.path.join(env.root, "agents", name, "secret-store",
                                     "sops-nix" if backend == "sops" else "secret-vars")
            self.pubs[name], self.keys[name], self.stores[name] = pub, key, store_dir
            inventory[name] = {"machineClass": "nixos", "tags": tags,
                               "deploy": {"targetHost": f"root@{name}"}}
            configs.append(f'''
    {name}.config = {{
      system.build.toplevel = import ./toplevel.nix {{
        name = "clan-{name}"; system = "{system}"; log = "{env.root}/activation.log";
        salt = "{env.salt}";
      }};
      clan.core.deployment.requireExplicitUpdate = {"true" if explicit else "false"};
      clan.core.vars.settings.secretStore = "{backend}";
      clan.core.vars.sops.secretUploadDirectory = "{store_dir if backend == "sops" else "/var/lib/sops-nix"}";
      clan.core.vars.password-store.secretLocation = "{store_dir if backend == "password-store" else "/etc/secret-vars"}";
      clan.core.vars.age.secretLocation = "{store_dir if backend == "age" else "/etc/secret-vars"}";
    }};''')
            fake[name] = {"backend": backend, "ageKey": f"AGE-SECRET-KEY-1{name.upper()}\n",
                          "secrets": {"app/password": f"pw-of-{name}"},
                          "activation": {"app/token": f"token-of-{name}"},
                          "passInfo": f"hash-{name}"}
        with open(os.path.join(clan, "flake.nix"), "w") as f:
            f.write(f'''{{
  outputs = {{ self }}: {{
    clanInternals.inventoryClass.inventorySerialization = {{
      meta.name = "fixture";
      machines = builtins.fromJSON ''{json.dumps(inventory)}'';
    }};
    nixosConfigurations = {{{"".join(configs)}
    }};
  }};
}}
''')
        with open(os.path.join(clan, "fake-clan.json"), "w") as f:
            json.dump(fake, f)
        bindir = os.path.join(env.root, "bin")
        os.makedirs(bindir)
        os.symlink(FAKE_CLAN, os.path.join(bindir, "clan"))
        self.clan_log = os.path.join(env.root, "fake-clan.log")
        self.clan_dir = clan
        self.bindir = bindir
        return clan

    def start_agents(self, env, *names):
        """Agents with the keys the clan's generator would have made (given by
        file), once the controller listens; none is registered by hand."""
        self.agents = getattr(self, "agents", {})
        for name in names:
            self.agents[name] = env.add_agent(
                name, register=False, machineKeyFile=self.keys[name],
                machineKeyCreatedAt=self.created_at, varsDir=self.stores[name]).start()
        for name in names:
            self.agents[name].wait_connected()

    def muster(self, env, *args, with_clan=True):
        e = env.cli_env()
        e["FAKE_CLAN_LOG"] = self.clan_log
        e["PATH"] = (self.bindir + ":" if with_clan else "") + e["PATH"]
        return subprocess.run([binary("muster"), "--config", os.path.join(env.cli_dir, "config.json"),
                               *args], capture_output=True, text=True, timeout=600, env=e)

    def publish(self, env, *args, with_clan=True):
        cache = env.ensure_cache()
        return self.muster(env, "publish", "--clan", "--flake", f"path:{self.clan_dir}",
                           "--cache", cache.url, "--cache-key", cache.secret, "--yes", *args,
                           with_clan=with_clan)

    def assert_layout(self, root, want_files):
        """Exactly these files (plus muster's own hash marker), dirs 0700,
        files 0400, all root:root."""
        found = set()
        for d, dirs, files in os.walk(root):
            st = os.stat(d)
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o700, d)
            self.assertEqual((st.st_uid, st.st_gid), (0, 0), d)
            for n in files:
                p = os.path.join(d, n)
                rel = os.path.relpath(p, root)
                if rel == ".muster-vars-hash":
                    continue
                st = os.lstat(p)
                self.assertTrue(stat.S_ISREG(st.st_mode), p)
                self.assertEqual(stat.S_IMODE(st.st_mode), 0o400, p)
                self.assertEqual((st.st_uid, st.st_gid), (0, 0), p)
                found.add(rel)
        self.assertEqual(found, set(want_files))

    def test_publish_clan_resolves_the_inventory_and_delivers_each_backend(self):
        env = self.env
        env.init_controller()
        self.make_clan(env)
        roster = os.path.join(env.root, "roster.json")
        r = subprocess.run([binary("muster"), "--key", env.op_key, "roster", "sign", "--clan",
                            "--flake", f"path:{self.clan_dir}", "--out", roster],
                           capture_output=True, text=True, env=nix_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("5 signed", r.stderr)
        env.start_controller(["--roster", roster])
        env.controller.wait_log(r"5 added")
        self.start_agents(env, "web1", "pw1", "age1", "laptop")

        # Tags are AND-ed; laptop (requireExplicitUpdate) is skipped, web2 lacks "eu".
        r = self.publish(env, "--tag", "web", "--tag", "eu", "--wait", "--timeout", "300")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("skipped laptop: clan.core.deployment.requireExplicitUpdate", r.stderr)
        self.assertIn("rollout ", r.stdout)
        self.assertEqual(sorted(env.activation_log()),
                         ["clan-age1 switch nixos", "clan-pw1 switch nixos",
                          "clan-web1 switch nixos"])
        self.assertIsNone(env.status("web2")["generation"] or None)
        self.assertIsNone(env.status("laptop")["generation"] or None)

        # What clan's own upload would install, where the secret store expects it.
        web1 = self.agents["web1"].cfg["varsDir"]
        self.assert_layout(web1, ["key.txt", "activation/per-machine/app/token"])
        with open(os.path.join(web1, "key.txt")) as f:
            self.assertEqual(f.read(), "AGE-SECRET-KEY-1WEB1\n")
        age1 = self.agents["age1"].cfg["varsDir"]
        self.assertTrue(age1.endswith("/secret-vars"), age1)
        self.assert_layout(age1, ["key.txt", "activation/per-machine/app/token"])
        pw1 = self.agents["pw1"].cfg["varsDir"]
        self.assert_layout(pw1, ["secrets.tar.gz", "secrets_for_users.tar.gz", ".pass_info",
                                 "activation/per-machine/app/token"])
        with open(os.path.join(pw1, ".pass_info")) as f:
            self.assertEqual(f.read(), "hash-pw1")
        listing = subprocess.run(["tar", "-tzf", os.path.join(pw1, "secrets.tar.gz")],
                                 capture_output=True, text=True, check=True).stdout.split()
        self.assertIn("per-machine/app/password", listing)

        # Nothing plaintext stays behind; it went through a tmpfs where there is one.
        with open(self.clan_log) as f:
            calls = [json.loads(l) for l in f]
        self.assertEqual(sorted(c["machine"] for c in calls), ["age1", "pw1", "web1"])
        tmpfs = tmpfs_mounts()
        for c in calls:
            self.assertFalse(os.path.exists(c["directory"]), c["directory"])
            self.assertFalse(os.path.exists(os.path.dirname(c["directory"])))
            if "/dev/shm" in tmpfs:
                self.assertTrue(any(c["directory"].startswith(m + "/") for m in tmpfs),
                                c["directory"])

        # Named, laptop is published despite requireExplicitUpdate.
        r = self.publish(env, "laptop", "--wait", "--timeout", "300")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("clan-laptop switch nixos", env.activation_log())

        # A name that does not carry the tags, a missing clan: clear errors, nothing published.
        r = self.publish(env, "web2", "--tag", "eu")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("'web2' does not carry the tag 'eu'", r.stderr)
        r = self.publish(env, "web2", with_clan=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("'clan' is not on PATH", r.stderr)
        self.assertIn("clan-cli", r.stderr)
        self.assertIsNone(env.status("web2")["generation"] or None)

    def test_roster_file_changes_are_applied_and_unsigned_entries_refused(self):
        env = self.env
        env.init_controller()
        self.make_clan(env)
        roster = os.path.join(env.root, "roster.json")
        sign = [binary("muster"), "--key", env.op_key, "roster", "sign", "--out", roster]
        web1_pub = self.pubs["web1"]
        subprocess.run(sign + ["--machine", f"web1={web1_pub}"], check=True, capture_output=True)
        # The controller's key from a secret store (the clan generator's file, 0400):
        # init makes a certificate for it in place of the one for its own key, and
        # agents pin that key.
        ctl_key = os.path.join(env.root, "controller-var.key")
        subprocess.run([binary("muster"), "--key", ctl_key, "key", "generate"], check=True,
                       capture_output=True)
        os.chmod(ctl_key, 0o400)
        out = subprocess.run([binary("muster-controller"), "init", "--state-dir", env.ctl_dir,
                              "--key-file", ctl_key], capture_output=True, text=True,
                             check=True)
        self.assertIn("is not for the key in", out.stderr)
        pin = re.search(r"pin:\s+(sha256:[0-9a-f]{64})", out.stdout).group(1)
        self.assertNotEqual(pin, env.pin)
        env.pin = pin
        env.start_controller(["--roster", roster, "--key-file", ctl_key])
        env.controller.wait_log(r"1 added")
        self.start_agents(env, "web1")
        # Signing again with the same input keeps the entry: nothing to apply.
        before = read(roster)
        subprocess.run(sign + ["--machine", f"web1={web1_pub}"], check=True, capture_output=True)
        self.assertEqual(read(roster), before)

        # Dropping web1 from the input produces a signed removal, which the
        # running controller applies: the agent is disconnected.
        pw1_pub = self.pubs["pw1"]
        r = subprocess.run(sign + ["--machine", f"pw1={pw1_pub}"], capture_output=True, text=True)
        self.assertIn("1 signed, 0 unchanged, 1 removals", r.stderr)
        env.controller.wait_log(r"1 added, 0 updated, 0 with a new key, 1 removed, 0 revoked")
        wait_until(lambda: not any(m["name"] == "web1" for m in
                                   json.loads(env.cli("machine", "list", "--json").stdout)),
                   what="web1 removed")

        # An entry signed by a key that is not a registered operator is refused.
        rogue = os.path.join(env.root, "rogue.key")
        subprocess.run([binary("muster"), "--key", rogue, "key", "generate"], check=True,
                       capture_output=True)
        laptop_pub = self.pubs["laptop"]
        subprocess.run([binary("muster"), "--key", rogue, "roster", "sign", "--out", roster,
                        "--machine", f"laptop={laptop_pub}"], check=True, capture_output=True)
        env.controller.wait_log(r"refused 'laptop': roster entry for 'laptop' is signed by")
        names = [m["name"] for m in json.loads(env.cli("machine", "list", "--json").stdout)]
        self.assertNotIn("laptop", names)


if __name__ == "__main__":
    unittest.main()
