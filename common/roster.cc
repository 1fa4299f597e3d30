#include "common/roster.h"

#include <sodium.h>

#include <nlohmann/json.hpp>

#include "common/json_limits.h"

namespace muster {

using nlohmann::json;

namespace {
constexpr std::string_view kRosterDomain = "muster-roster-v1\n";
constexpr std::string_view kEnrollDomain = "muster-enroll-v1\n";
constexpr std::string_view kTokenPrefix = "mtok2_";
constexpr std::size_t kMaxTags = 64;

std::string BindingMessage(std::string_view machine, const PublicKey& key) {
  return std::string(kEnrollDomain) + std::string(machine) + "\n" + key.ToText();
}

std::string Describe(const Result<RosterEntry>& peek) {
  return peek ? "roster entry for machine '" + peek->machine + "'" : std::string("roster entry");
}
}  // namespace

Status ValidateMachineName(std::string_view name) {
  if (name.empty() || name.size() > 253 || name.front() == '-' || name.front() == '.' ||
      name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") !=
          std::string_view::npos) {
    return Err("machine name '" + std::string(name.substr(0, 64)) +
               "' is invalid: use 1-253 letters, digits, '-', '_' and '.', not starting with '-' "
               "or '.'");
  }
  return Status::Ok();
}

Status ValidateTags(const std::vector<std::string>& tags) {
  if (tags.size() > kMaxTags) return Err("at most 64 tags per machine");
  for (const auto& t : tags) {
    if (t.empty() || t.size() > 64 ||
        t.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:") !=
            std::string::npos) {
      return Err("tag '" + t.substr(0, 64) +
                 "' is invalid: use 1-64 letters, digits, '-', '_', '.' and ':'");
    }
  }
  return Status::Ok();
}

std::string RosterEntryToJson(const RosterEntry& e) {
  json j = {{"format", 1},
            {"machine", e.machine},
            {"key", e.key},
            {"enrollKey", e.enroll_key},
            {"tags", e.tags},
            {"removed", e.removed},
            {"expiresAt", e.expires_at},
            {"signedAt", e.signed_at}};
  if (e.revoked) j["revoked"] = true;  // absent in entries from before revocations were signed
  return DumpJson(j);
}

Result<RosterEntry> ParseRosterEntry(std::string_view text) {
  auto parsed = ParseJsonBounded(text, 64 * 1024, 4);
  if (!parsed) return Err("roster entry: " + parsed.message());
  const json& j = *parsed;
  try {
    if (!j.is_object()) return Err("roster entry is not a JSON object");
    if (JsonInt64Field(j, "format") != 1) {
      return Err("roster entry format " + j.at("format").dump() +
                 " is not supported; upgrade muster");
    }
    RosterEntry e;
    e.machine = j.at("machine").get<std::string>();
    e.key = j.at("key").get<std::string>();
    e.enroll_key = j.at("enrollKey").get<std::string>();
    e.tags = j.at("tags").get<std::vector<std::string>>();
    e.removed = j.at("removed").get<bool>();
    if (j.contains("revoked")) e.revoked = j.at("revoked").get<bool>();
    e.expires_at = JsonInt64Field(j, "expiresAt");
    e.signed_at = JsonInt64Field(j, "signedAt");
    if (auto st = ValidateMachineName(e.machine); !st) return Err("roster entry: " + st.message());
    if (auto st = ValidateTags(e.tags); !st) return Err("roster entry: " + st.message());
    int kinds = (e.key.empty() ? 0 : 1) + (e.enroll_key.empty() ? 0 : 1) + (e.removed ? 1 : 0);
    if (kinds != 1) {
      return Err("roster entry for '" + e.machine +
                 "' must name exactly one of a key, an enrolment key or a removal");
    }
    if (!e.key.empty()) {
      if (auto k = ParsePublicKey(e.key); !k) return Err("roster entry key: " + k.message());
    }
    if (!e.enroll_key.empty()) {
      if (auto k = ParsePublicKey(e.enroll_key); !k) {
        return Err("roster entry enrolment key: " + k.message());
      }
    }
    if (e.revoked && e.key.empty()) {
      return Err("roster entry for '" + e.machine + "' revokes no key");
    }
    if (e.signed_at <= 0) return Err("roster entry signedAt must be positive");
    return e;
  } catch (const json::exception& ex) {
    return Err(std::string("roster entry field missing or of the wrong type: ") + ex.what());
  }
}

SignedRosterEntry SignRosterEntry(const RosterEntry& e, const SecretKey& key) {
  SignedRosterEntry s;
  s.entry = RosterEntryToJson(e);
  s.signer = key.public_key().ToText();
  s.signature = Base64Encode(key.Sign(std::string(kRosterDomain) + s.entry));
  return s;
}

Result<RosterEntry> CheckRosterSignature(const SignedRosterEntry& s) {
  auto peek = ParseRosterEntry(s.entry);
  std::string what = Describe(peek);
  auto signer = ParsePublicKey(s.signer);
  if (!signer) return Err(what + ": signer: " + signer.message());
  auto sig = Base64Decode(s.signature);
  if (!sig || !VerifySignature(*signer, std::string(kRosterDomain) + s.entry, *sig)) {
    return Err(what + " has an invalid signature by key " + signer->ShortId() +
               "; it was altered after signing");
  }
  if (!peek) return Err("signed roster entry is invalid: " + peek.message());
  return peek;
}

Result<RosterEntry> VerifyRosterEntry(const SignedRosterEntry& s,
                                      const std::vector<PublicKey>& trusted) {
  auto signer = ParsePublicKey(s.signer);
  std::string what = Describe(ParseRosterEntry(s.entry));
  if (!signer) return Err(what + ": signer: " + signer.message());
  bool ok = false;
  for (const auto& k : trusted) ok = ok || k == *signer;
  if (!ok) {
    return Err(what + " is signed by key " + signer->ShortId() + " (" + s.signer +
               "), which this CLI does not trust; add it to trustedOperatorKeys in the CLI "
               "config if that operator is trusted, or check the machine's key fingerprint and "
               "re-sign it with 'muster machine sign'");
  }
  return CheckRosterSignature(s);
}

Result<SecretKey> EnrollKeyFromToken(std::string_view token) {
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' '))
    token.remove_suffix(1);
  if (token.substr(0, kTokenPrefix.size()) != kTokenPrefix) {
    return Err("enrolment token does not start with '" + std::string(kTokenPrefix) +
               "'; create one with 'muster machine enroll NAME' (tokens from muster before signed "
               "rosters are no longer accepted)");
  }
  std::string b64(token.substr(kTokenPrefix.size()));
  for (char& c : b64) {
    if (c == '-') c = '+';
    if (c == '_') c = '/';
  }
  auto seed = Base64Decode(b64);
  if (!seed || seed->size() != 32) return Err("enrolment token is damaged (bad length or base64)");
  return SecretKey::FromSeed(*seed);
}

std::string NewEnrollToken() {
  std::string seed(32, '\0');
  randombytes_buf(seed.data(), seed.size());
  std::string b64 = Base64Encode(seed);
  for (char& c : b64) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  sodium_memzero(seed.data(), seed.size());
  return std::string(kTokenPrefix) + b64;
}

EnrollBinding MakeEnrollBinding(const SecretKey& enroll_key, std::string_view machine,
                                const PublicKey& machine_key) {
  return {machine_key.ToText(),
          Base64Encode(enroll_key.Sign(BindingMessage(machine, machine_key)))};
}

Status VerifyEnrollBinding(const RosterEntry& grant, const EnrollBinding& b) {
  if (grant.enroll_key.empty()) {
    return Err("roster entry for '" + grant.machine + "' is not an enrolment grant");
  }
  auto ek = ParsePublicKey(grant.enroll_key);
  if (!ek) return Err("enrolment grant key: " + ek.message());
  auto mk = ParsePublicKey(b.key);
  if (!mk) return Err("enrolled key: " + mk.message());
  auto sig = Base64Decode(b.signature);
  if (!sig || !VerifySignature(*ek, BindingMessage(grant.machine, *mk), *sig)) {
    return Err("the enrolment of machine '" + grant.machine + "' with key " + mk->ShortId() +
               " is not signed by the key of the token the operator issued; it was not made by "
               "the holder of that token");
  }
  return Status::Ok();
}

Result<PublicKey> RosterKey(const RosterEntry& e, const std::optional<EnrollBinding>& binding) {
  if (e.removed) return Err("machine '" + e.machine + "' was removed from the roster");
  if (e.revoked) {
    return Err("machine '" + e.machine +
               "' is revoked: an operator signed that its key must not be trusted; remove it and "
               "add it again with a new key");
  }
  if (!e.key.empty()) return ParsePublicKey(e.key);
  if (!binding) {
    return Err("machine '" + e.machine +
               "' has an enrolment token but has not enrolled yet (start its agent with the "
               "token)");
  }
  if (auto st = VerifyEnrollBinding(e, *binding); !st) return st.error();
  return ParsePublicKey(binding->key);
}

std::string EncodeSignedRosterEntry(const SignedRosterEntry& s) {
  return json{{"entry", s.entry}, {"signer", s.signer}, {"signature", s.signature}}.dump();
}

Result<SignedRosterEntry> DecodeSignedRosterEntry(std::string_view text) {
  auto j = ParseJsonBounded(text, 128 * 1024, 4);
  if (!j) return Err("signed roster entry: " + j.message());
  try {
    return SignedRosterEntry{j->at("entry").get<std::string>(), j->at("signer").get<std::string>(),
                             j->at("signature").get<std::string>()};
  } catch (const json::exception& e) {
    return Err(std::string("signed roster entry: ") + e.what());
  }
}

std::string EncodeEnrollBinding(const EnrollBinding& b) {
  return json{{"key", b.key}, {"signature", b.signature}}.dump();
}

Result<EnrollBinding> DecodeEnrollBinding(std::string_view text) {
  auto j = ParseJsonBounded(text, 16 * 1024, 4);
  if (!j) return Err("enrolment binding: " + j.message());
  try {
    return EnrollBinding{j->at("key").get<std::string>(), j->at("signature").get<std::string>()};
  } catch (const json::exception& e) {
    return Err(std::string("enrolment binding: ") + e.what());
  }
}

std::string EncodeRosterFile(const std::vector<SignedRosterEntry>& entries) {
  json list = json::array();
  for (const auto& s : entries) {
    list.push_back({{"entry", s.entry}, {"signer", s.signer}, {"signature", s.signature}});
  }
  return json{{"format", 1}, {"entries", list}}.dump(2) + "\n";
}

Result<std::vector<SignedRosterEntry>> DecodeRosterFile(std::string_view text) {
  auto j = ParseJsonBounded(text, 64u << 20, 4);
  if (!j) return Err("roster file: " + j.message());
  if (!j->is_object() || j->value("format", 0) != 1 || !j->contains("entries") ||
      !(*j)["entries"].is_array()) {
    return Err(
        "roster file: expected {\"format\":1,\"entries\":[…]} as 'muster roster sign' writes it");
  }
  std::vector<SignedRosterEntry> out;
  for (const auto& e : (*j)["entries"]) {
    try {
      out.push_back({e.at("entry").get<std::string>(), e.at("signer").get<std::string>(),
                     e.at("signature").get<std::string>()});
    } catch (const json::exception&) {
      return Err("roster file: entry " + std::to_string(out.size() + 1) +
                 " needs the strings 'entry', 'signer' and 'signature'");
    }
  }
  return out;
}

}  // namespace muster
