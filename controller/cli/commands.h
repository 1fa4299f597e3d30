// The CLI's commands, one file per family (machine.cc, publish.cc,
// rollout.cc, observe.cc); main.cc only parses arguments. Each returns the
// process exit code after printing what happened.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "controller/cli/common.h"

namespace muster::cli {

// machine.cc — the signed roster.
int MachineAdd(const Globals& g, const std::string& name, const std::string& key,
               const std::vector<std::string>& tags);
int MachineTag(const Globals& g, const std::string& name, const std::vector<std::string>& tags);
// Signs the key the controller holds for name after the operator checked its
// fingerprint (expect_fingerprint, or a confirmation on the terminal).
int MachineSign(const Globals& g, const std::string& name, const std::string& expect_fingerprint,
                const std::vector<std::string>& tags, bool set_tags);
int MachineRemove(const Globals& g, const std::string& name);
// Signs that the machine's key (as the controller holds it) must not be
// trusted: every CLI then refuses to seal to it, and the controller refuses it.
int MachineRevoke(const Globals& g, const std::string& name);
int MachineList(const Globals& g);
int MachineEnroll(const Globals& g, const std::string& name, const std::vector<std::string>& tags,
                  std::int64_t ttl_s);
int OperatorList(const Globals& g);
int OperatorRemove(const Globals& g, const std::string& name);
// A request whose answer is only printed (revoke and the like).
int SimpleCall(const Globals& g, const std::string& method, const nlohmann::json& params,
               const std::string& ok_message);

// publish.cc
struct PublishArgs {
  std::vector<std::string> positionals;  // [MACHINE…] STOREPATH, or machines with --flake
  std::vector<std::string> machines;
  std::vector<std::string> tags;
  bool all = false;
  std::string flake;
  int build_jobs = 2;
  std::string action = "switch";
  std::string kind = "auto";
  std::string vars_dir;
  std::string vars_root;
  std::vector<std::string> substituters;
  std::vector<std::string> trusted_keys;
  std::string cache;
  std::string cache_key;
  bool force = false;
  // Maintenance windows: --stage realises at once and activates in the
  // machine's next window (the default for a rollout); --now ignores windows.
  bool stage = false;
  bool now = false;
  // --preview (and 'rollout preview'): ask each online target what the
  // generation would change; publish nothing.
  bool preview = false;
  bool wait = false;
  int timeout = 600;
  std::string canary;
  int max_parallel = 0;
  int max_failures = 0;
  bool clan = false;  // targets from the clan inventory, vars from 'clan vars upload' (clan.h)
};
int Publish(const Globals& g, PublishArgs a);
// preview.cc — sends signed preview requests (items: [{manifest, signer,
// signature}]), waits up to timeout_s for the online machines' answers and
// prints them per machine and in sum. 0 when every online target answered
// without error.
int RunPreview(Connection& c, const nlohmann::json& items, int timeout_s, bool json_out);

// rollout.cc
int Watch(Connection& c, const std::string& id, int timeout_s, bool json_out);
int Rollout(const Globals& g, const std::string& verb, const std::string& id, int timeout);
// retry.cc — re-publishes the failed (and rolled-back) machines of a finished
// rollout as a new rollout: the stored manifests are verified against trusted
// operator keys, then re-signed with new generation numbers; same closures,
// same sealed vars.
int RolloutRetry(const Globals& g, const std::string& id, bool wait, int timeout);

// cache.cc — the controller's binary cache. verb: status | gc.
int CacheCommand(const Globals& g, const std::string& verb);
// Uploads the closures of paths (signed with the cache key) without publishing.
int CachePush(const Globals& g, const std::vector<std::string>& paths, const std::string& key_file);
// Creates a Nix cache signing key (default ~/.config/muster/cache.key).
int CacheKeyGenerate(const Globals& g, const std::string& out, const std::string& name);

// dashboard.cc — prints a new dashboard access token (once); base_url, when
// given, makes it a link. revoke_all: removes every token instead.
int DashboardToken(const Globals& g, const std::string& base_url, bool revoke_all);

// webhook.cc — notification targets. add: secret_file "" makes a secret and
// prints it once. test: waits for the first attempt's outcome.
int WebhookAdd(const Globals& g, const std::string& url, const std::vector<std::string>& events,
               const std::string& secret_file);
int WebhookList(const Globals& g);
int WebhookRemove(const Globals& g, const std::string& id);
int WebhookTest(const Globals& g, const std::string& id, int timeout_s);

// observe.cc
int ShowStatus(const Globals& g, const std::string& machine);
int History(const Globals& g, const std::string& machine, int limit);
int Logs(const Globals& g, const std::string& machine, std::int64_t generation, bool follow);

}  // namespace muster::cli
