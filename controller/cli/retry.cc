// muster rollout retry: the failed and rolled-back machines of a rollout again,
// as a new rollout of newly signed generations naming the same closures.
#include <ctime>
#include <iostream>
#include <map>

#include "common/manifest.h"
#include "controller/cli/commands.h"
#include "controller/cli/trust.h"

using nlohmann::json;

namespace muster::cli {

int RolloutRetry(const Globals& g, const std::string& id, bool wait, int timeout) {
  SecretKey key = SecretKey::Generate();
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn, &key)) return rc;
  auto plan = conn->Call("rollout.retry-plan", {{"id", id}});
  if (!plan) return Die(plan.message(), kExitFailed);
  const json& items = (*plan)["items"];
  if (!items.is_array() || items.empty()) {
    return Die("rollout " + id + " has no failed or rolled-back machines to retry", kExitFailed);
  }
  std::string state = plan->value("state", "");
  if (state == "running" || state == "paused") {
    return Die("rollout " + id + " is still " + state + "; abort it first ('muster rollout abort " +
                   id + "') so that it releases nothing more",
               kExitFailed);
  }
  // Re-sign only what an operator this CLI trusts signed, for a machine whose
  // signed roster entry it verifies: never the controller's word.
  std::vector<PublicKey> trusted = TrustedOperatorKeys(g, key);
  SeenEntries seen(StateHome() + "/roster-seen.json");
  if (auto st = seen.Load(); !st) return Die(st.message(), kExitUsage);
  std::vector<std::string> names;
  for (const auto& it : items) names.push_back(it.value("machine", ""));
  auto roster = conn->Call("roster", {{"names", names}});
  if (!roster) return Die(roster.message(), kExitFailed);
  RosterView view((*roster)["machines"], (*roster)["removed"], trusted, seen);
  (void)seen.Save();

  struct Retry {
    Manifest manifest;
    std::string vars;  // base64 of the sealed box, as stored
  };
  std::vector<Retry> retries;
  for (const auto& it : items) {
    std::string machine = it.value("machine", "");
    if (auto m = view.Get(machine); !m) return Die(m.message(), kExitFailed);
    SignedManifest old{it.value("manifest", ""), it.value("signer", ""), it.value("signature", "")};
    auto signer = ParsePublicKey(old.signer);
    bool known = false;
    for (const auto& k : trusted) known = known || (signer && k == *signer);
    if (!known) {
      return Die("machine '" + machine + "' generation " +
                     std::to_string(it.value("generation", std::int64_t{0})) +
                     " is signed by a key this CLI does not trust; refusing to re-sign it",
                 kExitFailed);
    }
    auto sealed = Base64Decode(it.value("vars", ""));
    if (!sealed) return Die("machine '" + machine + "': " + sealed.message(), kExitFailed);
    VerifyContext ctx;
    ctx.machine = machine;
    ctx.trusted_operators = trusted;
    auto m = VerifySignedManifest(old, ctx, *sealed);
    if (!m) return Die(m.message() + "; refusing to re-sign it", kExitFailed);
    retries.push_back({*m, it.value("vars", "")});
  }

  for (int attempt = 0; attempt < 5; ++attempt) {
    auto numbers = conn->Call("roster", {{"names", names}});
    if (!numbers) return Die(numbers.message(), kExitFailed);
    std::map<std::string, std::int64_t> max_gen;
    for (const auto& m : (*numbers)["machines"]) {
      const json& v = m.contains("maxGeneration") ? m["maxGeneration"] : json(0);
      if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
          v.get<std::int64_t>() == INT64_MAX) {
        return Die("the controller reports an impossible generation number for '" +
                       m.value("name", "") + "'; refusing to sign",
                   kExitFailed);
      }
      max_gen[m.value("name", "")] = v.get<std::int64_t>();
    }
    const std::int64_t now = static_cast<std::int64_t>(std::time(nullptr));
    json signed_items = json::array();
    for (auto& r : retries) {
      Manifest m = r.manifest;  // same closure, kind, action, caches and vars
      m.generation = max_gen[m.machine] + 1;
      m.created_at = now;
      m.rollout = "";
      // A failed deploy may have left its closure active (nothing to roll
      // back to): activate and check it again rather than report "unchanged".
      m.force = true;
      if (auto st = CheckGenerationNumber(m.generation, now); !st) {
        return Die("machine '" + m.machine + "': " + st.message() + "; refusing to sign",
                   kExitFailed);
      }
      SignedManifest sm = SignManifest(m, key);
      signed_items.push_back({{"manifest", sm.manifest},
                              {"signer", sm.signer},
                              {"signature", sm.signature},
                              {"vars", r.vars}});
    }
    int max_parallel = plan->value("maxParallel", 0);
    int max_failures = plan->value("maxFailures", 0);
    auto res = conn->Call("rollout.create", {{"items", signed_items},
                                             {"canary", 0},
                                             {"maxParallel", max_parallel},
                                             {"maxFailures", max_failures}});
    if (!res) {
      if (res.message().find("not newer") != std::string::npos) continue;
      return Die(res.message(), kExitFailed);
    }
    std::string nid = (*res)["rollout"].get<std::string>();
    if (g.json_out) {
      std::cout << res->dump() << "\n";
    } else {
      std::cout << "rollout " << nid << ": retrying " << retries.size() << " machine"
                << (retries.size() == 1 ? "" : "s") << " of rollout " << id << ":";
      for (const auto& r : retries) std::cout << " " << Printable(r.manifest.machine);
      std::cout << "\n";
    }
    std::cout.flush();
    if (!wait) return 0;
    return Watch(*conn, nid, timeout, g.json_out);
  }
  return Die("could not publish: generations kept changing underneath", kExitFailed);
}

}  // namespace muster::cli
