// The CLI's view of the fleet roster: only what operator keys it trusts signed.
//
// The controller serves every machine's signed entry (and an enrolled
// machine's binding); this view verifies each against the operator keys the
// CLI trusts itself (its own key plus 'trustedOperatorKeys' from its config),
// never against anything the controller says. It also remembers, per machine,
// the newest entry this CLI has verified or signed (StateHome()/roster-seen.json)
// and refuses an older one, so that a controller cannot bring back a key or
// tags that were replaced or removed. Single-threaded.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"
#include "common/roster.h"
#include "controller/cli/common.h"

namespace muster::cli {

// Own key first, then trustedOperatorKeys.
std::vector<PublicKey> TrustedOperatorKeys(const Globals& g, const SecretKey& own);

// Newest signedAt per machine this CLI has seen verified or signed.
class SeenEntries {
 public:
  explicit SeenEntries(std::string path) : path_(std::move(path)) {}
  Status Load();  // a missing file is empty; a damaged one is an error
  Status Save();  // atomic, 0600, only when something changed
  std::int64_t Get(const std::string& machine) const;
  void Note(const std::string& machine, std::int64_t signed_at);

 private:
  std::string path_;
  std::map<std::string, std::int64_t> seen_;
  bool dirty_ = false;
};

struct TrustedMachine {
  std::string name;
  PublicKey key;
  std::vector<std::string> tags;
  std::string signer;  // short id of the operator key that signed the entry
  std::int64_t signed_at = 0;
  bool enrolled = false;  // the key came from an enrolment binding
};

class RosterView {
 public:
  // machines: the controller's "roster" (or machine.list) answer's list;
  // removed: its signed removals (may be empty).
  RosterView(const nlohmann::json& machines, const nlohmann::json& removed,
             const std::vector<PublicKey>& trusted, SeenEntries& seen);

  // The verified entry of a machine, or why it cannot be trusted.
  Result<TrustedMachine> Get(const std::string& name) const;
  // Names (sorted) of verified machines with any of tags, or all with all.
  std::vector<std::string> Select(const std::vector<std::string>& tags, bool all) const;
  // Machines the controller listed that could not be verified: name → reason.
  const std::map<std::string, std::string>& untrusted() const { return untrusted_; }
  // Whether the controller listed the machine at all.
  bool Listed(const std::string& name) const { return listed_.count(name) != 0; }

 private:
  std::map<std::string, TrustedMachine> trusted_;
  std::map<std::string, std::string> untrusted_;
  std::map<std::string, bool> listed_;
};

// Signs an entry and sends it with method (machine.add/tag/sign/remove);
// records it as seen. Returns the controller's answer.
Result<nlohmann::json> SendEntry(Connection& c, const std::string& method, const RosterEntry& e,
                                 const SecretKey& key, SeenEntries& seen);

nlohmann::json EntryToJson(const SignedRosterEntry& s);
Result<SignedRosterEntry> EntryFromJson(const nlohmann::json& j);

}  // namespace muster::cli
