// muster publish: resolve targets through the signed roster, sign manifests,
// seal vars to verified keys, publish one generation or a rollout.
#include <sodium.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>

#include "common/manifest.h"
#include "common/parallel.h"
#include "common/phase.h"
#include "common/preview.h"
#include "common/rollout_items.h"
#include "common/vars_bundle.h"
#include "controller/cli/cache.h"
#include "controller/cli/clan.h"
#include "controller/cli/commands.h"
#include "controller/cli/flake.h"
#include "controller/cli/trust.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace muster::cli {

namespace {

constexpr std::size_t kTargetsShown = 100;

// Waits for the machine's report on generation gen to reach a terminal phase.
// With stop_at_staged, "staged" (waiting for a maintenance window) ends the
// wait successfully too.
int WaitFor(Connection& c, const std::string& machine, std::int64_t gen, int timeout_s,
            bool json_out, bool stop_at_staged) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Die("timed out after " + std::to_string(timeout_s) + " s waiting for " + machine +
                     " generation " + std::to_string(gen) + " (it continues; see 'muster status " +
                     machine + "')",
                 kExitTimeout);
    }
    auto ev = c.NextEvent(std::min(left, std::chrono::milliseconds(1000)));
    if (!ev) return Die(ev.message(), kExitConnect);
    if (!*ev) continue;
    const proto::Event& e = **ev;
    if (e.topic != "status") continue;
    if (e.data.value("machine", "") != machine ||
        e.data.value("generation", std::int64_t{0}) != gen)
      continue;
    std::string phase = e.data.value("phase", "");
    std::string detail = e.data.value("detail", "");
    if (json_out) {
      std::cout << e.data.dump() << "\n";
    } else {
      std::cout << Timestamp(e.data.value("at", std::int64_t{0})) << "  " << machine << "  gen "
                << gen << "  " << Printable(phase)
                << (detail.empty() ? "" : "  " + Printable(detail)) << "\n";
    }
    std::cout.flush();
    auto ph = ParsePhase(phase);
    if (ph && *ph == Phase::kStaged && stop_at_staged) return 0;
    if (ph && IsTerminal(*ph)) {
      return (*ph == Phase::kSucceeded || *ph == Phase::kUnchanged) ? 0 : kExitFailed;
    }
  }
}

// Parses --canary N or P% against the number of machines.
Result<int> CanaryCount(const std::string& text, std::size_t total) {
  if (text.empty()) return 0;
  try {
    if (text.back() == '%') {
      double p = std::stod(text.substr(0, text.size() - 1));
      if (p < 0 || p > 100) return Err("--canary percent must be between 0 and 100");
      return static_cast<int>(std::ceil(p / 100.0 * static_cast<double>(total)));
    }
    std::size_t used = 0;
    int n = std::stoi(text, &used);
    if (used != text.size() || n < 0) throw std::invalid_argument("x");
    return n;
  } catch (const std::exception&) {
    return Err("--canary takes a count (e.g. 2) or a percentage (e.g. 10%), not '" + text + "'");
  }
}

// The highest generation number the controller reports for each machine;
// anything but a plain integer in [0, INT64_MAX) is refused here, so that
// adding one cannot overflow.
Result<std::map<std::string, std::int64_t>> MaxGenerations(const json& roster) {
  std::map<std::string, std::int64_t> out;
  for (const auto& m : roster["machines"]) {
    std::string name = m.value("name", "");
    const json& v = m.contains("maxGeneration") ? m["maxGeneration"] : json(0);
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() >= INT64_MAX) ||
        v.get<std::int64_t>() < 0 || v.get<std::int64_t>() == INT64_MAX) {
      return Err("the controller reports an impossible generation number " + v.dump() +
                 " for machine '" + name +
                 "'; refusing to sign (the controller may be steering "
                 "generation numbers)");
    }
    out[name] = v.get<std::int64_t>();
  }
  return out;
}

}  // namespace

int Publish(const Globals& g, PublishArgs a) {
  auto action = ParseAction(a.action);
  if (!action) return Die("--action must be switch, boot, test or dry-activate", kExitUsage);
  auto kind = ParseKind(a.kind);
  if (!kind) return Die("--kind must be auto, nixos, darwin, home-manager or profile", kExitUsage);
  if (a.stage && a.now) return Die("--stage and --now exclude each other", kExitUsage);
  if (a.cache.empty()) a.cache = g.cache;
  if (a.cache_key.empty()) a.cache_key = g.cache_key;
  if (a.substituters.empty()) a.substituters = g.substituters;
  if (a.trusted_keys.empty()) a.trusted_keys = g.trusted_keys;
  // Closures go through the controller's own cache unless the operator runs a
  // cache (--cache, or substituters of their own): signed by the operator's
  // Nix cache key, named in the manifest as the reserved "muster:".
  const bool names_controller = std::find(a.substituters.begin(), a.substituters.end(),
                                          kControllerSubstituter) != a.substituters.end();
  std::optional<nar::SigningKey> upload_key;
  if (a.cache.empty() && (a.substituters.empty() || names_controller)) {
    auto k = LoadCacheKey(a.cache_key);
    if (k) {
      upload_key = *k;
      if (a.substituters.empty()) a.substituters = {kControllerSubstituter};
      std::string pub = nar::PublicKeyText(*k);
      if (std::find(a.trusted_keys.begin(), a.trusted_keys.end(), pub) == a.trusted_keys.end()) {
        a.trusted_keys.push_back(pub);
      }
    } else if (names_controller || !a.cache_key.empty()) {
      return Die(k.message(), kExitUsage);
    } else if (!g.json_out) {
      std::cerr << "muster: " << k.message()
                << "; publishing without uploading the closure (machines must have it already)\n";
    }
  }
  if (a.substituters.empty() && !a.cache.empty()) a.substituters = {a.cache};
  if (a.trusted_keys.empty() && !a.cache_key.empty()) {
    auto pub = CachePublicKey(a.cache_key);
    if (!pub) return Die(pub.message(), kExitUsage);
    a.trusted_keys = {*pub};
  }

  // Targets and toplevel(s).
  std::string storepath;
  std::unique_ptr<ClanFlake> clan;
  if (a.clan) {
    // The clan's inventory picks the machines (then checked against the
    // signed roster like any other names); clan's secret store gives vars.
    if (a.flake.empty()) a.flake = ".";
    if (a.flake.find('#') != std::string::npos) {
      return Die("--clan takes the clan flake without #MACHINE; name machines as arguments",
                 kExitUsage);
    }
    if (!a.vars_dir.empty() || !a.vars_root.empty()) {
      return Die("--clan takes vars from 'clan vars upload'; drop --vars / --vars-root",
                 kExitUsage);
    }
    clan = std::make_unique<ClanFlake>(a.flake);
    auto t = clan->Targets({a.positionals, a.tags, a.all});
    if (!t) return Die(t.message(), kExitUsage);
    a.positionals.clear();
    a.machines = *t;
    a.tags.clear();
    a.all = false;
  }
  if (!a.flake.empty()) {
    auto hash = a.flake.find('#');
    if (hash != std::string::npos) {
      a.machines.push_back(a.flake.substr(hash + 1));
      a.flake = a.flake.substr(0, hash);
    }
    for (const auto& p : a.positionals) a.machines.push_back(p);
  } else {
    if (a.positionals.empty() || a.positionals.back().rfind("/nix/store/", 0) != 0) {
      return Die("give the system toplevel as the last argument (/nix/store/…) or use --flake",
                 kExitUsage);
    }
    storepath = a.positionals.back();
    if (auto st = ValidateStorePath(storepath); !st) return Die(st.message(), kExitUsage);
    a.machines.insert(a.machines.end(), a.positionals.begin(), a.positionals.end() - 1);
  }
  SecretKey key = SecretKey::Generate();
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn, &key)) return rc;
  std::vector<PublicKey> trusted = TrustedOperatorKeys(g, key);
  SeenEntries seen(StateHome() + "/roster-seen.json");
  if (auto st = seen.Load(); !st) return Die(st.message(), kExitUsage);

  // Resolve targets through entries signed by operator keys this CLI trusts:
  // never through the controller's word.
  const bool by_tag = a.all || !a.tags.empty();
  json params = json::object();
  if (!by_tag) params["names"] = a.machines;
  auto roster = conn->Call("roster", params);
  if (!roster) return Die(roster.message(), kExitFailed);
  RosterView view((*roster)["machines"], (*roster)["removed"], trusted, seen);
  (void)seen.Save();
  std::vector<std::string> targets;
  std::set<std::string> taken;  // in order, each once (a fleet is thousands)
  for (const auto& name : a.machines) {
    if (auto m = view.Get(name); !m) return Die(m.message(), kExitFailed);
    if (taken.insert(name).second) targets.push_back(name);
  }
  if (by_tag) {
    for (const auto& name : view.Select(a.tags, a.all)) {
      if (taken.insert(name).second) targets.push_back(name);
    }
    std::size_t skipped = 0;
    for (const auto& [name, why] : view.untrusted()) {
      if (why == "revoked") continue;
      if (skipped++ < 10) {
        std::cerr << "muster: not considered: " << Printable(name) << ": " << why << "\n";
      }
    }
    if (skipped > 10) {
      std::cerr << "muster: … and " << skipped - 10 << " more machines not considered\n";
    }
  }
  if (targets.empty())
    return Die("no machines to publish to (name them, or use --tag / --all)", kExitUsage);
  if (!g.json_out) {
    std::cerr << "publishing to " << targets.size()
              << (targets.size() == 1 ? " machine" : " machines") << " (signed roster):\n";
    for (std::size_t i = 0; i < targets.size() && i < kTargetsShown; ++i) {
      auto m = view.Get(targets[i]);
      std::cerr << "  " << Printable(targets[i]) << "  " << m->key.Fingerprint() << "\n";
    }
    if (targets.size() > kTargetsShown) {
      std::cerr << "  … and " << targets.size() - kTargetsShown << " more\n";
    }
  }
  if (targets.size() > 1 && !g.yes && !a.preview && Interactive() &&
      !Confirm("Publish to these " + std::to_string(targets.size()) + " machines?")) {
    return Die("not published", kExitFailed);
  }
  bool rollout =
      targets.size() > 1 || !a.canary.empty() || a.max_parallel > 0 || a.max_failures > 0 || a.clan;
  auto canary = CanaryCount(a.canary, targets.size());
  if (!canary) return Die(canary.message(), kExitUsage);

  std::map<std::string, std::string> toplevels;
  if (!a.flake.empty()) {
    FlakeBuildOptions fo;
    fo.flake = a.flake;
    fo.jobs = a.build_jobs;
    fo.cache = a.cache;
    fo.cache_key = upload_key ? "" : a.cache_key;  // uploads are signed here
    fo.on_line = [&](const std::string& m, const std::string& line) {
      std::cerr << "[" << m << "] " << Printable(line) << "\n";
    };
    auto built = BuildFromFlake(fo, targets);
    if (!built) return Die(built.message(), kExitFailed);
    toplevels = *built;
  } else {
    for (const auto& t : targets) toplevels[t] = storepath;
  }

  if (upload_key) {
    std::vector<std::string> tops;
    for (const auto& [m, t] : toplevels) {
      if (std::find(tops.begin(), tops.end(), t) == tops.end()) tops.push_back(t);
    }
    UploadOptions uo;
    uo.progress = !g.json_out && ::isatty(2);
    auto st = UploadClosures(
        conn,
        [&]() -> std::unique_ptr<Connection> {
          std::unique_ptr<Connection> again;
          if (OpenConnection(g, &again, &key) != 0) return nullptr;
          return again;
        },
        tops, *upload_key, uo);
    if (!st) return Die(st.message(), kExitFailed);
  }

  if (a.preview) {
    // Signed like a publish, under the preview domain (common/preview.h):
    // no vars, no generation number, nothing published.
    const std::int64_t created_at = static_cast<std::int64_t>(std::time(nullptr));
    json items = json::array();
    for (const auto& machine : targets) {
      Manifest m;
      m.machine = machine;
      m.toplevel = toplevels.at(machine);
      m.kind = *kind;
      m.substituters = a.substituters;
      m.trusted_public_keys = a.trusted_keys;
      m.created_at = created_at;
      // A nonce, so that two previews in one second are not taken for a replay.
      std::string nonce(8, '\0');
      randombytes_buf(nonce.data(), nonce.size());
      m.rollout = "preview-" + HexEncode(nonce);
      SignedManifest sm = SignPreview(m, key);
      items.push_back(
          {{"manifest", sm.manifest}, {"signer", sm.signer}, {"signature", sm.signature}});
    }
    return RunPreview(*conn, items, a.timeout, g.json_out);
  }

  // Vars are sealed once per machine, to the key its verified entry names:
  // the bundles are read in order (files, clan), then sealed on every core.
  const std::size_t n = targets.size();
  std::optional<std::string> shared_plain;
  std::size_t shared_count = 0;
  if (!a.vars_dir.empty()) {
    auto b = ReadVarsDirectory(a.vars_dir);
    if (!b) return Die(b.message(), kExitUsage);
    shared_plain = EncodeVarsBundle(*b);  // one encoding for every machine
    shared_count = b->files.size();
  }
  std::vector<std::string> own_plain(n);
  std::vector<const std::string*> plain(n, nullptr);
  std::vector<std::size_t> var_counts(n, 0);
  std::vector<PublicKey> keys(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& machine = targets[i];
    keys[i] = view.Get(machine)->key;
    if (shared_plain) {
      plain[i] = &*shared_plain;
      var_counts[i] = shared_count;
    }
    std::optional<VarsBundle> bundle;
    if (!a.vars_root.empty()) {
      std::error_code ec;
      fs::path dir = fs::path(a.vars_root) / machine;
      if (fs::is_directory(dir, ec)) {
        auto b = ReadVarsDirectory(dir);
        if (!b) return Die(b.message(), kExitUsage);
        bundle = std::move(*b);
      }
    }
    if (clan) {
      auto b = clan->Vars(machine);  // plaintext only in memory once this returns
      if (!b) return Die(b.message(), kExitFailed);
      bundle = std::move(*b);
    }
    if (bundle) {
      own_plain[i] = EncodeVarsBundle(*bundle);
      plain[i] = &own_plain[i];
      var_counts[i] = bundle->files.size();
    }
  }
  std::vector<std::string> boxes(n), vars_hashes(n);
  std::vector<std::optional<Error>> seal_errors(n);
  ParallelFor(n, [&](std::size_t i) {
    if (!plain[i]) return;
    auto box = SealTo(keys[i], *plain[i]);
    if (!box) {
      seal_errors[i] = box.error();
      return;
    }
    vars_hashes[i] = VarsHash(*box);
    boxes[i] = std::move(*box);
  });
  for (auto& p : own_plain) sodium_memzero(p.data(), p.size());
  own_plain.clear();
  for (const auto& e : seal_errors) {
    if (e) return Die(e->message, kExitFailed);
  }
  if (a.wait) {
    auto sub = conn->Call("subscribe", json::object());
    if (!sub) return Die(sub.message(), kExitFailed);
  }

  // The numbers come from the first answer (no copy of it), or from a newer one.
  const json* numbers_src = &*roster;
  json again_answer;
  for (int attempt = 0; attempt < 5; ++attempt) {
    if (attempt > 0) {
      // After a race the numbers changed: ask again for exactly the targets
      // (the first answer, for names or for the whole fleet, had them all).
      auto again = conn->Call("roster", {{"names", targets}});
      if (!again) return Die(again.message(), kExitFailed);
      again_answer = std::move(*again);
      numbers_src = &again_answer;
    }
    auto max_gen = MaxGenerations(*numbers_src);
    if (!max_gen) return Die(max_gen.message(), kExitFailed);
    const std::int64_t created_at = static_cast<std::int64_t>(std::time(nullptr));
    std::vector<std::int64_t> numbers(n);
    for (std::size_t i = 0; i < n; ++i) {
      numbers[i] = (*max_gen)[targets[i]] + 1;
      if (auto st = CheckGenerationNumber(numbers[i], created_at); !st) {
        return Die("machine '" + targets[i] + "': " + st.message() + "; refusing to sign",
                   kExitFailed);
      }
    }
    // One signature per machine, on every core.
    std::vector<SignedManifest> signed_manifests(n);
    ParallelFor(n, [&](std::size_t i) {
      Manifest m;
      m.machine = targets[i];
      m.generation = numbers[i];
      m.toplevel = toplevels.at(targets[i]);
      m.kind = *kind;
      m.action = *action;
      m.substituters = a.substituters;
      m.trusted_public_keys = a.trusted_keys;
      m.vars_hash = vars_hashes[i];
      m.created_at = created_at;
      m.force = a.force;
      m.in_window = a.stage || (rollout && !a.now);
      signed_manifests[i] = SignManifest(m, key);
    });
    auto item_json = [&](std::size_t i) {
      const SignedManifest& sm = signed_manifests[i];
      return json{{"manifest", sm.manifest},
                  {"signer", sm.signer},
                  {"signature", sm.signature},
                  {"vars", boxes[i].empty() ? "" : Base64Encode(boxes[i])}};
    };
    if (!rollout) {
      auto res = conn->Call("publish", item_json(0));
      if (!res) {
        if (res.message().find("not newer") != std::string::npos)
          continue;  // raced another publish
        return Die(res.message(), kExitFailed);
      }
      const std::string& machine = targets[0];
      bool online = res->value("online", false);
      if (g.json_out) {
        std::cout << res->dump() << "\n";
      } else {
        std::cout << "published " << machine << " generation " << numbers[0] << ": " << a.action
                  << " " << toplevels[machine]
                  << (!boxes[0].empty() ? " with " + std::to_string(var_counts[0]) + " vars files"
                                        : "")
                  << (a.stage ? " (staged: activates in its next maintenance window)" : "")
                  << (online ? "" : " (machine offline: it gets it when it connects)") << "\n";
      }
      std::cout.flush();
      if (!a.wait) return 0;
      return WaitFor(*conn, machine, numbers[0], a.timeout, g.json_out, a.stage);
    }
    // The items in one binary frame (common/rollout_items.h): no base64 of
    // the sealed vars and no JSON document of the whole fleet.
    json create = {{"count", n},
                   {"signer", key.public_key().ToText()},
                   {"canary", *canary},
                   {"maxParallel", a.max_parallel},
                   {"maxFailures", a.max_failures}};
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bytes += 8 + kRolloutSignatureBytes + signed_manifests[i].manifest.size() + boxes[i].size();
    }
    std::string payload;
    payload.reserve(bytes);
    for (std::size_t i = 0; i < n; ++i) {
      auto sig = Base64Decode(signed_manifests[i].signature);
      AppendRolloutItem(payload, signed_manifests[i].manifest, *sig, boxes[i]);
    }
    const auto create_timeout = std::chrono::seconds(300);
    auto res =
        conn->Await(conn->Send("rollout.create", create, std::move(payload)), create_timeout);
    if (!res && res.message().find("'items' must be") != std::string::npos) {
      // A controller from before the binary form: the same items as JSON.
      json items = json::array();
      for (std::size_t i = 0; i < n; ++i) items.push_back(item_json(i));
      create.erase("count");
      create.erase("signer");
      create["items"] = std::move(items);
      res = conn->Call("rollout.create", std::move(create), create_timeout);
    }
    if (!res) {
      if (res.message().find("not newer") != std::string::npos) continue;
      return Die(res.message(), kExitFailed);
    }
    std::string id = (*res)["rollout"].get<std::string>();
    if (g.json_out) {
      std::cout << res->dump() << "\n";
    } else {
      std::cout << "rollout " << id << ": " << targets.size() << " machines, canary " << *canary
                << ", max parallel "
                << (a.max_parallel ? std::to_string(a.max_parallel) : "unlimited")
                << ", max failures " << a.max_failures << "\n";
    }
    std::cout.flush();
    if (!a.wait) return 0;
    return Watch(*conn, id, a.timeout, g.json_out);
  }
  return Die("could not publish: generations kept changing underneath", kExitFailed);
}

}  // namespace muster::cli
