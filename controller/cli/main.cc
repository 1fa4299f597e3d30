// muster: the operator CLI. Talks to the controller over /v1/operator with the
// operator's key; signs manifests and roster entries and seals vars locally
// (the controller never sees an operator's private key or a plaintext secret).
// This file only parses arguments; the commands live in one file per family.
//
// Exit codes: 0 success; 1 the operation failed (refused by the controller, or a
// waited-for deploy did not succeed); 2 usage or configuration error; 3 cannot
// reach or authenticate with the controller; 4 --wait timed out.
#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>

#include "common/crypto.h"
#include "common/fsutil.h"
#include "controller/cli/clan.h"
#include "controller/cli/commands.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace muster;
using namespace muster::cli;

int main(int argc, char** argv) {
  InitCrypto();
  CLI::App app{"muster: publish signed system generations and watch them land"};
  app.set_version_flag("--version", std::string("muster ") + MUSTER_VERSION);
  app.fallthrough();  // global options may follow the subcommand
  app.require_subcommand(1);
  Globals g;
  app.add_option("--controller", g.controller,
                 "controller URL, wss://HOST:PORT (env MUSTER_CONTROLLER)");
  app.add_option("--pin", g.pin, "controller key pin, sha256:… (env MUSTER_PIN)");
  app.add_option("--key", g.key,
                 "operator key file (env MUSTER_KEY; default ~/.config/muster/operator.key)");
  app.add_option("--config", g.config,
                 "CLI config file (env MUSTER_CONFIG; default ~/.config/muster/config.json)");
  app.add_flag("--json", g.json_out, "machine-readable output");
  app.add_flag("-y,--yes", g.yes, "do not ask for confirmation");

  auto* key = app.add_subcommand("key", "operator keys");
  key->require_subcommand(1);
  std::string key_out;
  auto* key_gen =
      key->add_subcommand("generate", "create an operator key and print its public key");
  key_gen->add_option("--out", key_out, "where to write it (default: --key path)");
  auto* key_show = key->add_subcommand("show", "print the public key of the operator key");
  bool key_cache = false;
  std::string key_cache_name;
  key_gen->add_flag("--cache", key_cache,
                    "create a Nix binary-cache signing key instead (default "
                    "~/.config/muster/cache.key), used by 'muster publish' to sign uploads");
  key_gen->add_option("--name", key_cache_name,
                      "with --cache: the key's name (default HOST-muster-1)");

  auto* cache = app.add_subcommand("cache", "the controller's binary cache");
  cache->require_subcommand(1);
  auto* cache_status = cache->add_subcommand("status", "size, paths and what GC would free");
  auto* cache_gc = cache->add_subcommand("gc", "remove paths no machine needs now");
  std::vector<std::string> push_paths;
  std::string push_key;
  auto* cache_push =
      cache->add_subcommand("push", "upload closures to the controller without publishing");
  cache_push->add_option("STOREPATH", push_paths, "store paths whose closures to upload")
      ->required();
  cache_push->add_option("--cache-key", push_key,
                         "Nix secret key file (default ~/.config/muster/cache.key)");

  auto* machine = app.add_subcommand("machine", "register and list machines");
  machine->require_subcommand(1);
  std::string m_name, m_key;
  std::vector<std::string> m_tags;
  auto* m_add = machine->add_subcommand("add", "register a machine's public key");
  m_add->add_option("NAME", m_name)->required();
  m_add->add_option("--key", m_key, "the key printed by 'muster-agent --print-key'")->required();
  m_add->add_option("--tag", m_tags, "tag (repeatable)")->allow_extra_args(false);
  auto* m_list = machine->add_subcommand("list", "list machines");
  auto* m_remove = machine->add_subcommand("remove", "forget a machine and close its connection");
  m_remove->add_option("NAME", m_name)->required();
  auto* m_tag = machine->add_subcommand("tag", "replace a machine's tags (a new signed entry)");
  m_tag->add_option("NAME", m_name)->required();
  m_tag->add_option("--tag", m_tags, "tag (repeatable; none clears)")->allow_extra_args(false);
  std::string m_fp;
  auto* m_sign = machine->add_subcommand(
      "sign",
      "sign the key the controller holds for a machine after checking its fingerprint "
      "(unsigned machines from before signed rosters)");
  m_sign->alias("approve");
  m_sign->add_option("NAME", m_name)->required();
  m_sign->add_option("--fingerprint", m_fp,
                     "expected sha256:… of the machine key ('muster-agent --print-key' shows it)");
  auto* m_sign_tags =
      m_sign->add_option("--tag", m_tags, "tags to sign (default: keep)")->allow_extra_args(false);

  auto* op = app.add_subcommand("operator", "operators of this controller");
  op->require_subcommand(1);
  std::string op_name;
  auto* op_list = op->add_subcommand("list", "list operator keys");
  auto* op_remove =
      op->add_subcommand("remove", "refuse an operator's key from now on and close its sessions");
  op_remove->add_option("NAME", op_name)->required();

  PublishArgs pa;
  auto* publish = app.add_subcommand(
      "publish",
      "sign and publish a generation: 'publish MACHINE… STOREPATH', 'publish --tag T STOREPATH', "
      "or 'publish --flake FLAKE#MACHINE' / '--flake FLAKE --tag T'");
  // Shared by 'publish' and 'rollout preview' (which previews instead).
  auto publish_options = [&pa](CLI::App* sc) {
    sc->add_option("TARGETS", pa.positionals,
                   "machine names, then the system toplevel /nix/store/…");
    sc->add_option("--machine", pa.machines, "machine (repeatable)")->allow_extra_args(false);
    sc->add_option("--tag", pa.tags, "every machine with this tag (repeatable)")
        ->allow_extra_args(false);
    sc->add_flag("--all", pa.all, "every registered machine");
    sc->add_option("--flake", pa.flake,
                   "build each machine's system from this flake (FLAKE or FLAKE#MACHINE)");
    sc->add_flag("--clan", pa.clan,
                 "a clan flake (--flake, default .): machines and --tag (AND) from its "
                 "inventory, honouring requireExplicitUpdate; vars from 'clan vars upload'; "
                 "one rollout");
    sc->add_option("--build-jobs", pa.build_jobs, "concurrent builds with --flake")
        ->capture_default_str();
    sc->add_option("--cache", pa.cache,
                   "binary cache of your own to copy built closures to (nix copy --to); "
                   "default: upload to the controller");
    sc->add_option("--cache-key", pa.cache_key,
                   "Nix secret key file to sign closures with (default "
                   "~/.config/muster/cache.key from 'muster key generate --cache')");
    sc->add_option("--action", pa.action, "switch | boot | test | dry-activate")
        ->capture_default_str();
    sc->add_option("--kind", pa.kind, "auto | nixos | darwin | home-manager | profile")
        ->capture_default_str();
    sc->add_option("--vars", pa.vars_dir, "directory of vars to seal to each machine");
    sc->add_option("--vars-root", pa.vars_root,
                   "directory with one vars directory per machine name");
    sc->add_option("--substituter", pa.substituters,
                   "binary cache URL agents fetch from (repeatable)")
        ->allow_extra_args(false);
    sc->add_option("--trusted-public-key", pa.trusted_keys,
                   "cache signing key name:base64 (repeatable)")
        ->allow_extra_args(false);
    sc->add_flag("--force", pa.force, "activate even if the closure is already active");
    sc->add_flag("--stage", pa.stage,
                 "realise at once, activate in each machine's next maintenance window "
                 "(the default for a rollout; machines without windows activate at once)");
    sc->add_flag("--now", pa.now, "activate at once, outside maintenance windows too");
    sc->add_option("--canary", pa.canary, "machines deployed first, as a count or a percentage");
    sc->add_option("--max-parallel", pa.max_parallel,
                   "machines in flight at once after the canaries (0: all)");
    sc->add_option("--max-failures", pa.max_failures, "halt the rollout when more machines fail");
    sc->add_flag("--wait", pa.wait,
                 "follow the deploy or rollout live; exit code says whether it succeeded");
    sc->add_option("--timeout", pa.timeout, "seconds to --wait")->capture_default_str();
  };
  publish_options(publish);
  publish->add_flag("--preview", pa.preview,
                    "ask each online target what this would change (download, store paths, "
                    "package versions, units, reboot) and publish nothing");

  RosterSignArgs rs;
  auto* roster =
      app.add_subcommand("roster", "the declarative roster (muster-controller --roster)");
  roster->require_subcommand(1);
  auto* roster_sign = roster->add_subcommand(
      "sign", "sign roster entries for machine keys into a file for 'muster-controller --roster'");
  roster_sign->add_option("--machine", rs.machines, "NAME=ed25519:… (repeatable)")
      ->allow_extra_args(false);
  roster_sign->add_option("--keys", rs.keys_file,
                          "JSON file {\"NAME\": \"ed25519:…\" or {\"key\", \"tags\"}}");
  roster_sign->add_flag("--clan", rs.clan,
                        "every clan machine with a muster-agent key (public value), with its "
                        "inventory tags");
  roster_sign->add_option("--flake", rs.flake, "the clan flake's directory with --clan")
      ->capture_default_str();
  roster_sign->add_option("-o,--out", rs.out,
                          "roster file to write; unchanged entries in it are kept, machines no "
                          "longer listed get a signed removal (default: stdout)");

  auto* rollout = app.add_subcommand("rollout", "staged rollouts");
  rollout->require_subcommand(1);
  std::string r_id;
  int r_timeout = 3600;
  auto* r_list = rollout->add_subcommand("list", "recent rollouts");
  std::vector<CLI::App*> r_cmds;
  for (const char* verb : {"status", "pause", "resume", "abort", "watch"}) {
    auto* sc = rollout->add_subcommand(verb, std::string(verb) + " a rollout");
    sc->add_option("ID", r_id)->required();
    if (std::string(verb) == "watch") sc->add_option("--timeout", r_timeout)->capture_default_str();
    r_cmds.push_back(sc);
  }

  auto* r_preview = rollout->add_subcommand(
      "preview",
      "what publishing to these machines would change on each of them, and in sum (takes "
      "the arguments of 'publish'; publishes nothing)");
  publish_options(r_preview);

  bool retry_wait = false;
  auto* r_retry = rollout->add_subcommand(
      "retry", "publish the failed and rolled-back machines of a rollout again, as a new rollout");
  r_retry->add_option("ID", r_id)->required();
  r_retry->add_flag("--wait", retry_wait, "follow the new rollout live");
  r_retry->add_option("--timeout", r_timeout, "seconds, with --wait")->capture_default_str();

  std::string e_name;
  std::vector<std::string> e_tags;
  std::int64_t e_ttl = 3600;
  auto* m_enroll =
      machine->add_subcommand("enroll", "print a one-time token an agent uses to register itself");
  m_enroll->add_option("NAME", e_name)->required();
  m_enroll->add_option("--tag", e_tags, "tag (repeatable)")->allow_extra_args(false);
  m_enroll->add_option("--ttl", e_ttl, "seconds the token stays valid")->capture_default_str();
  auto* m_revoke =
      machine->add_subcommand("revoke", "refuse a machine's key and close its connection");
  m_revoke->add_option("NAME", m_name)->required();

  std::string s_machine;
  auto* status = app.add_subcommand("status", "machines and where their deploys stand");
  status->add_option("MACHINE", s_machine);

  int h_limit = 10;
  auto* history = app.add_subcommand("history", "generations of a machine and their events");
  history->add_option("MACHINE", s_machine)->required();
  history->add_option("--limit", h_limit)->capture_default_str();

  std::int64_t l_gen = 0;
  bool l_follow = false;
  auto* logs = app.add_subcommand("logs", "output of realise and activation on a machine");
  logs->add_option("MACHINE", s_machine)->required();
  logs->add_option("--generation", l_gen, "generation (default: the newest)");
  logs->add_flag("-f,--follow", l_follow, "keep printing new lines");

  auto* hook =
      app.add_subcommand("webhook", "notifications on deploys, rollouts, offline machines");
  hook->require_subcommand(1);
  std::string w_url, w_id, w_secret_file;
  std::vector<std::string> w_events;
  int w_timeout = 30;
  auto* w_add = hook->add_subcommand("add", "POST signed JSON notifications to a URL");
  w_add->add_option("URL", w_url, "http:// or https:// address of the receiver")->required();
  w_add
      ->add_option("--event", w_events,
                   "deploy, rollout, offline or test (repeatable; default all)")
      ->allow_extra_args(false);
  w_add->add_option("--secret-file", w_secret_file,
                    "file holding the HMAC secret (default: make one and print it once)");
  auto* w_list = hook->add_subcommand("list", "webhooks and the queued deliveries");
  auto* w_remove = hook->add_subcommand("remove", "remove a webhook and its queued deliveries");
  w_remove->add_option("ID", w_id)->required();
  auto* w_test = hook->add_subcommand("test", "send a test notification and report the outcome");
  w_test->add_option("ID", w_id)->required();
  w_test->add_option("--timeout", w_timeout, "seconds to wait for the attempt")
      ->capture_default_str();

  auto* dash = app.add_subcommand("dashboard", "the controller's web dashboard (--http-listen)");
  dash->require_subcommand(1);
  std::string d_url;
  bool d_revoke = false;
  auto* dash_token = dash->add_subcommand(
      "token",
      "print a new access token for a dashboard that listens beyond loopback (shown once)");
  dash_token->add_option("--url", d_url,
                         "the dashboard's address, e.g. http://10.0.0.1:8080, to print a link");
  dash_token->add_flag("--revoke-all", d_revoke, "revoke every dashboard token instead");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (auto st = ResolveGlobals(g); !st) return Die(st.message(), kExitUsage);

  if (key_gen->parsed() && key_cache) return CacheKeyGenerate(g, key_out, key_cache_name);
  if (cache_status->parsed()) return CacheCommand(g, "status");
  if (cache_gc->parsed()) return CacheCommand(g, "gc");
  if (cache_push->parsed())
    return CachePush(g, push_paths, push_key.empty() ? g.cache_key : push_key);
  if (key_gen->parsed()) {
    std::string out = key_out.empty() ? g.key : key_out;
    std::error_code ec;
    if (fs::exists(out, ec))
      return Die(out + " already exists; refusing to overwrite a key", kExitUsage);
    fs::path parent = fs::path(out).parent_path();
    if (!parent.empty()) {
      if (auto st = MakeDirs(parent, 0700); !st) return Die(st.message(), kExitUsage);
    }
    SecretKey k = SecretKey::Generate();
    if (auto st = SaveSecretKey(k, out); !st) return Die(st.message(), kExitFailed);
    std::string pub = k.public_key().ToText();
    (void)WriteFileAtomic(out + ".pub", pub + "\n", 0644);
    if (g.json_out) {
      std::cout << json{{"key", pub}, {"path", out}}.dump() << "\n";
    } else {
      std::cout << pub << "\n";
      std::cerr << "wrote " << out << " (0600) and " << out << ".pub\n";
    }
    return 0;
  }
  if (key_show->parsed()) {
    auto k = LoadSecretKey(g.key);
    if (!k) return Die(k.message(), kExitUsage);
    std::cout << k->public_key().ToText() << "\n";
    return 0;
  }
  if (m_add->parsed()) return MachineAdd(g, m_name, m_key, m_tags);
  if (m_remove->parsed()) return MachineRemove(g, m_name);
  if (m_tag->parsed()) return MachineTag(g, m_name, m_tags);
  if (m_sign->parsed()) return MachineSign(g, m_name, m_fp, m_tags, m_sign_tags->count() > 0);
  if (m_list->parsed()) return MachineList(g);
  if (op_list->parsed()) return OperatorList(g);
  if (op_remove->parsed()) return OperatorRemove(g, op_name);
  if (publish->parsed()) return Publish(g, pa);
  if (r_preview->parsed()) {
    pa.preview = true;
    return Publish(g, pa);
  }
  if (roster_sign->parsed()) return RosterSign(g, rs);
  if (r_list->parsed()) return Rollout(g, "list", "", 0);
  if (r_retry->parsed()) return RolloutRetry(g, r_id, retry_wait, r_timeout);
  for (auto* sc : r_cmds) {
    if (sc->parsed()) return Rollout(g, sc->get_name(), r_id, r_timeout);
  }
  if (m_revoke->parsed()) {
    return MachineRevoke(g, m_name);
  }
  if (m_enroll->parsed()) return MachineEnroll(g, e_name, e_tags, e_ttl);
  if (w_add->parsed()) return WebhookAdd(g, w_url, w_events, w_secret_file);
  if (w_list->parsed()) return WebhookList(g);
  if (w_remove->parsed()) return WebhookRemove(g, w_id);
  if (w_test->parsed()) return WebhookTest(g, w_id, w_timeout);
  if (dash_token->parsed()) return DashboardToken(g, d_url, d_revoke);
  if (status->parsed()) return ShowStatus(g, s_machine);
  if (history->parsed()) return History(g, s_machine, h_limit);
  if (logs->parsed()) return Logs(g, s_machine, l_gen, l_follow);
  return 0;
}
