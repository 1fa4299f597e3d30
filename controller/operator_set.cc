#include "controller/operator_set.h"

#include <algorithm>
#include <set>

#include "common/crypto.h"
#include "common/json_limits.h"
#include "common/utf8.h"

namespace muster {

namespace {

constexpr const char* kManagedSetting = "managed_operators";
constexpr std::size_t kMaxOperatorFileBytes = 1u << 20;

bool ValidOperatorName(std::string_view n) {
  if (n.empty() || n.size() > 64) return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '@' || c == '-';
  });
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out.empty() ? "none" : out;
}

// The names recorded as managed; an unreadable record counts as none (the
// declaration then only adds, and records itself).
std::vector<std::string> ManagedNames(Store& store) {
  auto text = store.GetSetting(kManagedSetting);
  if (!text) return {};
  auto j = ParseJsonBounded(*text, kMaxOperatorFileBytes);
  std::vector<std::string> out;
  if (!j || !j->is_array()) return out;
  for (const auto& n : *j) {
    if (n.is_string()) out.push_back(n.get<std::string>());
  }
  return out;
}

Status RecordManaged(Store& store, const std::set<std::string>& names) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& n : names) j.push_back(n);
  return store.SetSetting(kManagedSetting, j.dump());
}

}  // namespace

Result<OperatorSet> ParseOperatorSet(std::string_view json_text) {
  auto j = ParseJsonBounded(json_text, kMaxOperatorFileBytes);
  if (!j) return Err("operators file: " + j.message());
  if (!j->is_object()) {
    return Err("operators file: expected an object {\"name\": \"ed25519:…\"}");
  }
  OperatorSet out;
  for (const auto& [name, key] : j->items()) {
    if (!ValidOperatorName(name)) {
      return Err("operators file: '" + SanitizeUtf8(name) +
                 "' is not an operator name (1-64 of A-Z a-z 0-9 . _ @ -)");
    }
    if (!key.is_string()) return Err("operators file: the key of '" + name + "' is not a string");
    auto pk = ParsePublicKey(key.get<std::string>());
    if (!pk) return Err("operators file: operator '" + name + "': " + pk.message());
    out[name] = pk->ToText();
  }
  return out;
}

OperatorSyncPlan PlanOperatorSync(const OperatorSet& declared, const OperatorSet& registered,
                                  const std::vector<std::string>& managed_before) {
  OperatorSyncPlan plan;
  std::set<std::string> managed(managed_before.begin(), managed_before.end());
  for (const auto& [name, key] : declared) {
    auto it = registered.find(name);
    if (it == registered.end()) {
      plan.add.push_back(name);
    } else if (it->second != key) {
      plan.rekey.push_back(name);
    }
  }
  for (const auto& [name, key] : registered) {
    if (declared.count(name)) continue;
    (managed.count(name) ? plan.remove : plan.kept).push_back(name);
  }
  return plan;
}

Result<std::string> SyncOperators(Fleet& fleet, Store& store, const OperatorSet& declared) {
  OperatorSet registered;
  for (const auto& op : store.ListOperators()) registered[op.name] = op.key;
  auto before = ManagedNames(store);
  auto plan = PlanOperatorSync(declared, registered, before);
  // Record first what this run may add, so that an interrupted run still
  // knows to remove it once it is no longer declared.
  std::set<std::string> managed(before.begin(), before.end());
  for (const auto& [name, key] : declared) managed.insert(name);
  if (auto st = RecordManaged(store, managed); !st) return st.error();

  for (const auto& name : plan.add) {
    if (auto st = fleet.AddOperator(name, declared.at(name)); !st) {
      return Err("operator '" + name + "': " + st.message() +
                 " (is its key registered under another name? 'muster-controller operator "
                 "remove' that one)");
    }
  }
  for (const auto& name : plan.rekey) {
    if (auto st = fleet.RemoveOperator(name); !st) {
      return Err("operator '" + name +
                 "' has a new key but the old one cannot be removed: " + st.message());
    }
    if (auto st = fleet.AddOperator(name, declared.at(name)); !st) {
      return Err("operator '" + name + "': " + st.message());
    }
  }
  for (const auto& name : plan.remove) {
    if (auto st = fleet.RemoveOperator(name); !st) {
      return Err("operator '" + name +
                 "' is no longer declared but cannot be removed: " + st.message());
    }
  }
  std::set<std::string> now;
  for (const auto& [name, key] : declared) now.insert(name);
  if (auto st = RecordManaged(store, now); !st) return st.error();
  return "operators: " + std::to_string(declared.size()) + " declared; added " + Join(plan.add) +
         "; new key " + Join(plan.rekey) + "; removed " + Join(plan.remove) +
         "; kept (added by hand) " + Join(plan.kept);
}

}  // namespace muster
