// Declaratively managed operators: the set a NixOS module or clan instance
// declares ('muster-controller operator sync --file FILE', run before every
// start), applied to the fleet so that an operator removed from the
// declaration stops being trusted.
//
// The store remembers which operators the declaration manages (setting
// "managed_operators"); operators added by hand ('operator add') and never
// declared are left alone. Applying the same set again changes nothing. An
// operator declared under a new key gets it (the old key is refused and its
// sessions close). Not thread-safe: used by one short-lived process.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "controller/fleet.h"
#include "controller/store.h"

namespace muster {

// name → key text ("ed25519:…"), ordered by name.
using OperatorSet = std::map<std::string, std::string>;

// Parses {"alice": "ed25519:…", …}: names of 1–64 characters from
// [A-Za-z0-9._@-], keys that parse. On failure nothing is returned and the
// message names the entry.
Result<OperatorSet> ParseOperatorSet(std::string_view json_text);

struct OperatorSyncPlan {
  std::vector<std::string> add;     // declared, not registered
  std::vector<std::string> rekey;   // declared and registered under another key
  std::vector<std::string> remove;  // managed before, no longer declared, still registered
  std::vector<std::string> kept;    // registered, never managed: added by hand
};

// What applying `declared` changes, given the registered operators and the
// names the declaration managed until now. Pure.
OperatorSyncPlan PlanOperatorSync(const OperatorSet& declared, const OperatorSet& registered,
                                  const std::vector<std::string>& managed_before);

// Applies `declared`: adds, then re-keys, then removes (so the fleet never has
// no operator), and records the declared names as managed. Fails when a key
// is registered under another name or when removing would leave no operator;
// what was done before the failure stays done and a later run completes it.
// On success returns one line saying what changed.
Result<std::string> SyncOperators(Fleet& fleet, Store& store, const OperatorSet& declared);

}  // namespace muster
