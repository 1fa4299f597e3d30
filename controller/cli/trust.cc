#include "controller/cli/trust.h"

#include <algorithm>
#include <filesystem>

#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/parallel.h"

using nlohmann::json;

namespace muster::cli {

std::vector<PublicKey> TrustedOperatorKeys(const Globals& g, const SecretKey& own) {
  std::vector<PublicKey> out{own.public_key()};
  for (const auto& k : g.trusted_operator_keys) {
    if (auto pk = ParsePublicKey(k)) out.push_back(*pk);  // checked by ResolveGlobals
  }
  return out;
}

Status SeenEntries::Load() {
  std::error_code ec;
  if (!std::filesystem::exists(path_, ec)) return Status::Ok();
  auto text = ReadFile(path_, 64 << 20);
  if (!text) return text.error();
  auto j = ParseJsonBounded(*text, 64 << 20, 4);
  if (!j || !j->is_object()) {
    return Err(path_ +
               " is damaged (not a JSON object); it records the newest roster entry "
               "this CLI saw per machine: fix or remove it");
  }
  for (const auto& [name, v] : j->items()) {
    if (v.is_number_integer()) seen_[name] = v.get<std::int64_t>();
  }
  return Status::Ok();
}

Status SeenEntries::Save() {
  if (!dirty_) return Status::Ok();
  std::filesystem::path p(path_);
  if (p.has_parent_path()) {
    if (auto st = MakeDirs(p.parent_path(), 0700); !st) return st;
  }
  json j = json::object();
  for (const auto& [name, at] : seen_) j[name] = at;
  if (auto st = WriteFileAtomic(path_, j.dump() + "\n", 0600); !st) return st;
  dirty_ = false;
  return Status::Ok();
}

std::int64_t SeenEntries::Get(const std::string& machine) const {
  auto it = seen_.find(machine);
  return it == seen_.end() ? 0 : it->second;
}

void SeenEntries::Note(const std::string& machine, std::int64_t signed_at) {
  auto& v = seen_[machine];
  if (signed_at > v) {
    v = signed_at;
    dirty_ = true;
  }
}

json EntryToJson(const SignedRosterEntry& s) {
  return {{"entry", s.entry}, {"signer", s.signer}, {"signature", s.signature}};
}

Result<SignedRosterEntry> EntryFromJson(const json& j) {
  if (!j.is_object()) return Err("no signed roster entry");
  auto str = [&](const char* k) -> std::string {
    auto it = j.find(k);
    return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  SignedRosterEntry s{str("entry"), str("signer"), str("signature")};
  if (s.entry.empty() || s.signer.empty() || s.signature.empty()) {
    return Err("signed roster entry is incomplete");
  }
  return s;
}

RosterView::RosterView(const json& machines, const json& removed,
                       const std::vector<PublicKey>& trusted, SeenEntries& seen) {
  // Verified removals first: an entry not newer than one is gone.
  std::map<std::string, std::int64_t> removed_at;
  if (removed.is_array()) {
    for (const auto& r : removed) {
      auto s = EntryFromJson(r);
      if (!s) continue;
      auto e = VerifyRosterEntry(*s, trusted);
      if (!e || !e->removed) continue;
      removed_at[e->machine] = std::max(removed_at[e->machine], e->signed_at);
      seen.Note(e->machine, e->signed_at);
    }
  }
  if (!machines.is_array()) return;
  // The signatures first, on every core (a fleet of 10,000 is 10,000
  // Ed25519 verifications); the rules below run in order on their results.
  const std::size_t n = machines.size();
  std::vector<std::optional<SignedRosterEntry>> entries(n);
  std::vector<std::optional<Result<RosterEntry>>> verified(n);
  ParallelFor(n, [&](std::size_t i) {
    const json& m = machines[i];
    if (!m.is_object()) return;
    auto it = m.find("roster");
    if (it == m.end()) return;
    auto s = EntryFromJson(*it);
    if (!s) return;
    verified[i] = VerifyRosterEntry(*s, trusted);
    entries[i] = std::move(*s);
  });
  for (std::size_t i = 0; i < n; ++i) {
    const json& m = machines[i];
    if (!m.is_object() || !m.contains("name") || !m["name"].is_string()) continue;
    std::string name = m["name"].get<std::string>();
    listed_[name] = true;
    auto fail = [&](std::string why) { untrusted_[name] = std::move(why); };
    if (m.value("revoked", false)) {
      fail("revoked");
      continue;
    }
    if (!entries[i]) {
      fail(
          "unsigned: registered before signed rosters; check its key fingerprint and run "
          "'muster machine sign " +
          name + "'");
      continue;
    }
    const SignedRosterEntry* s = &*entries[i];
    const Result<RosterEntry>& e = *verified[i];
    if (!e) {
      fail(e.message());
      continue;
    }
    if (e->machine != name) {
      fail("the controller lists it with the entry of machine '" + e->machine + "'");
      continue;
    }
    if (e->removed) {
      fail("removed from the roster");
      continue;
    }
    std::int64_t newest = std::max(seen.Get(name), removed_at[name]);
    if (e->signed_at < newest) {
      fail("the controller served a roster entry signed at " + Timestamp(e->signed_at) +
           ", older than one this CLI saw (" + Timestamp(newest) +
           "); it may be replaying a replaced key, tags or a removed machine");
      continue;
    }
    std::optional<EnrollBinding> binding;
    if (m.contains("binding") && m["binding"].is_object()) {
      const json& b = m["binding"];
      binding = EnrollBinding{b.value("key", ""), b.value("signature", "")};
    }
    auto key = RosterKey(*e, binding);
    if (!key) {
      fail(key.message());
      continue;
    }
    seen.Note(name, e->signed_at);
    auto signer = ParsePublicKey(s->signer);
    trusted_[name] = {name,         *key,
                      e->tags,      signer ? signer->ShortId() : s->signer,
                      e->signed_at, !e->enroll_key.empty()};
  }
}

Result<TrustedMachine> RosterView::Get(const std::string& name) const {
  if (auto it = trusted_.find(name); it != trusted_.end()) return it->second;
  if (auto it = untrusted_.find(name); it != untrusted_.end()) {
    return Err("machine '" + name + "' cannot be trusted: " + it->second);
  }
  return Err("no machine named '" + name + "'; add it with 'muster machine add'");
}

std::vector<std::string> RosterView::Select(const std::vector<std::string>& tags, bool all) const {
  std::vector<std::string> out;
  for (const auto& [name, m] : trusted_) {
    bool take = all;
    for (const auto& t : m.tags) {
      take = take || std::find(tags.begin(), tags.end(), t) != tags.end();
    }
    if (take) out.push_back(name);
  }
  return out;
}

Result<json> SendEntry(Connection& c, const std::string& method, const RosterEntry& e,
                       const SecretKey& key, SeenEntries& seen) {
  SignedRosterEntry s = SignRosterEntry(e, key);
  auto res = c.Call(method, {{"entry", EntryToJson(s)}});
  if (!res) return res.error();
  seen.Note(e.machine, e.signed_at);
  if (auto st = seen.Save(); !st) return st.error();
  return res;
}

}  // namespace muster::cli
