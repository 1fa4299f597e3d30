// The signed fleet roster: which key belongs to which machine, and its tags.
//
// The roster is operators' data, not the controller's. Each machine's entry is
// a JSON text signed by an operator key (domain "muster-roster-v1\n"); the
// controller stores and serves it but cannot produce one. The CLI seals vars
// only to a key whose entry it verified against operator keys it trusts itself,
// and resolves --tag / --all only through signed tags.
//
// An entry either names the machine's key directly (machine add, machine sign)
// or is an enrolment grant: it names a one-time enrolment public key derived
// from the token the operator handed to the machine, and the machine completes
// it with a binding — its own key signed by the token's key (domain
// "muster-enroll-v1\n"). Only a holder of the token can produce the binding, and
// the token never reaches the controller, so the controller alone cannot
// complete a grant.
//
// Entries for one machine are ordered by signedAt (unix ms): a newer entry
// replaces an older one; a removal is an entry with "removed": true; a
// revocation names the key with "revoked": true.
// All functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"

namespace muster {

struct RosterEntry {
  std::string machine;
  std::string key;         // "ed25519:…" machine key; "" for a grant or a removal
  std::string enroll_key;  // "ed25519:…" enrolment key of a grant; "" otherwise
  std::vector<std::string> tags;
  bool removed = false;
  bool revoked = false;         // the key is compromised: never seal to it (names the key)
  std::int64_t expires_at = 0;  // grants: unix ms after which the controller refuses to bind
  std::int64_t signed_at = 0;   // unix ms on the signing operator's clock
};

// An entry as it travels and is stored: the exact signed text plus signature.
struct SignedRosterEntry {
  std::string entry;      // exact JSON text that was signed
  std::string signer;     // "ed25519:…" operator key
  std::string signature;  // base64 Ed25519 signature
};

// A machine's completion of a grant: its key, signed by the enrolment key.
struct EnrollBinding {
  std::string key;        // "ed25519:…" the machine's own key
  std::string signature;  // base64 Ed25519 signature by the grant's enrolment key
};

// Machine names: 1-253 characters of [A-Za-z0-9._-], not starting with '-' or '.'.
Status ValidateMachineName(std::string_view name);
// Tags: 1-64 characters of [A-Za-z0-9._:-]; at most 64 tags per entry.
Status ValidateTags(const std::vector<std::string>& tags);

std::string RosterEntryToJson(const RosterEntry& e);
// Strict parse: format, field types, names, keys and tags checked.
Result<RosterEntry> ParseRosterEntry(std::string_view text);
SignedRosterEntry SignRosterEntry(const RosterEntry& e, const SecretKey& key);

// Parses and checks the signature against `trusted` (operator keys). On
// failure the message names the machine, the signer and what to do.
Result<RosterEntry> VerifyRosterEntry(const SignedRosterEntry& s,
                                      const std::vector<PublicKey>& trusted);
// Checks the signature only (any signer); for the controller, which verifies
// the signer against its own operator table separately.
Result<RosterEntry> CheckRosterSignature(const SignedRosterEntry& s);

// The enrolment key pair derived from a token's 32-byte seed.
Result<SecretKey> EnrollKeyFromToken(std::string_view token);
// A fresh token: "muster-enroll-v1:<base64 of 32 random bytes>".
std::string NewEnrollToken();
// What the agent sends to complete a grant for `machine` with `machine_key`.
EnrollBinding MakeEnrollBinding(const SecretKey& enroll_key, std::string_view machine,
                                const PublicKey& machine_key);
Status VerifyEnrollBinding(const RosterEntry& grant, const EnrollBinding& b);

// The machine key an entry vouches for: its key, or a grant's bound key. Fails
// for removals, revocations, grants without a valid binding, and bad keys.
Result<PublicKey> RosterKey(const RosterEntry& e, const std::optional<EnrollBinding>& binding);

// JSON forms used on the wire and in the store.
std::string EncodeSignedRosterEntry(const SignedRosterEntry& s);
Result<SignedRosterEntry> DecodeSignedRosterEntry(std::string_view text);
std::string EncodeEnrollBinding(const EnrollBinding& b);

// A roster file ('muster roster sign' writes it, 'muster-controller run
// --roster' reads it): {"format":1,"entries":[{"entry","signer","signature"}…]}.
// Decoding checks the shape only; signatures are the reader's business.
std::string EncodeRosterFile(const std::vector<SignedRosterEntry>& entries);
Result<std::vector<SignedRosterEntry>> DecodeRosterFile(std::string_view text);
Result<EnrollBinding> DecodeEnrollBinding(std::string_view text);

}  // namespace muster
