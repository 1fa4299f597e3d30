#include "common/manifest.h"

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "common/json_limits.h"

namespace muster {

using nlohmann::json;

namespace {
constexpr std::string_view kSigDomain = "muster-manifest-v1\n";
constexpr std::string_view kStoreDir = "/nix/store/";

}  // namespace

std::string_view ToString(Action a) {
  switch (a) {
    case Action::kSwitch:
      return "switch";
    case Action::kBoot:
      return "boot";
    case Action::kTest:
      return "test";
    case Action::kDryActivate:
      return "dry-activate";
  }
  return "switch";
}

std::string_view ToString(Kind k) {
  switch (k) {
    case Kind::kAuto:
      return "auto";
    case Kind::kNixos:
      return "nixos";
    case Kind::kDarwin:
      return "darwin";
    case Kind::kHomeManager:
      return "home-manager";
    case Kind::kProfile:
      return "profile";
  }
  return "auto";
}

std::optional<Action> ParseAction(std::string_view s) {
  for (Action a : {Action::kSwitch, Action::kBoot, Action::kTest, Action::kDryActivate}) {
    if (ToString(a) == s) return a;
  }
  return std::nullopt;
}

std::optional<Kind> ParseKind(std::string_view s) {
  for (Kind k : {Kind::kAuto, Kind::kNixos, Kind::kDarwin, Kind::kHomeManager, Kind::kProfile}) {
    if (ToString(k) == s) return k;
  }
  return std::nullopt;
}

Status ValidateStorePath(std::string_view p) {
  if (p.substr(0, kStoreDir.size()) != kStoreDir) {
    return Err("'" + std::string(p) + "' is not a Nix store path under /nix/store");
  }
  std::string_view base = p.substr(kStoreDir.size());
  if (base.size() < 34 || base[32] != '-' || base.find('/') != std::string_view::npos) {
    return Err("'" + std::string(p) +
               "' is not a top-level Nix store path (/nix/store/<hash>-<name>)");
  }
  for (char c : base) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '-' || c == '.' || c == '_' || c == '?' || c == '=';
    if (!ok) return Err("'" + std::string(p) + "' contains characters not allowed in store paths");
  }
  return Status::Ok();
}

std::string ManifestToJson(const Manifest& m) {
  json j = {
      {"format", 1},
      {"machine", m.machine},
      {"generation", m.generation},
      {"toplevel", m.toplevel},
      {"kind", ToString(m.kind)},
      {"action", ToString(m.action)},
      {"substituters", m.substituters},
      {"trustedPublicKeys", m.trusted_public_keys},
      {"varsHash", m.vars_hash},
      {"createdAt", m.created_at},
      {"force", m.force},
      {"rollout", m.rollout},
  };
  if (m.in_window) j["schedule"] = "window";
  return DumpJson(j);
}

Result<Manifest> ParseManifest(std::string_view text) {
  auto parsed = ParseJsonBounded(text, 64 * 1024, 8);
  if (!parsed) return Err("manifest: " + parsed.message());
  const json& j = *parsed;
  try {
    if (!j.is_object()) return Err("manifest is not a JSON object");
    if (JsonInt64Field(j, "format") != 1) {
      return Err("manifest format " + j.at("format").dump() +
                 " is not supported by this agent; upgrade muster-agent");
    }
    Manifest m;
    m.machine = j.at("machine").get<std::string>();
    m.generation = JsonInt64Field(j, "generation");
    m.toplevel = j.at("toplevel").get<std::string>();
    auto kind = ParseKind(j.at("kind").get<std::string>());
    if (!kind) return Err("manifest kind " + j.at("kind").dump() + " is unknown");
    m.kind = *kind;
    auto action = ParseAction(j.at("action").get<std::string>());
    if (!action) return Err("manifest action " + j.at("action").dump() + " is unknown");
    m.action = *action;
    m.substituters = j.at("substituters").get<std::vector<std::string>>();
    m.trusted_public_keys = j.at("trustedPublicKeys").get<std::vector<std::string>>();
    m.vars_hash = j.at("varsHash").get<std::string>();
    m.created_at = JsonInt64Field(j, "createdAt");
    m.force = j.at("force").get<bool>();
    m.rollout = j.value("rollout", std::string());
    if (j.contains("schedule")) {
      const std::string schedule = j.at("schedule").get<std::string>();
      if (schedule != "window" && schedule != "now") {
        return Err("manifest schedule \"" + schedule + "\" is unknown (window or now)");
      }
      m.in_window = schedule == "window";
    }
    if (m.machine.empty() || m.machine.size() > 253) return Err("manifest machine name is invalid");
    if (m.generation <= 0) return Err("manifest generation must be positive");
    if (auto st = ValidateStorePath(m.toplevel); !st) return Err("manifest: " + st.message());
    for (const auto& s : m.substituters) {
      if (s.empty() || s.find_first_of(" \n\t") != std::string::npos) {
        return Err("manifest substituter '" + s + "' is invalid");
      }
    }
    for (const auto& k : m.trusted_public_keys) {
      if (k.find(':') == std::string::npos || k.find_first_of(" \n\t") != std::string::npos) {
        return Err("manifest trusted public key '" + k + "' is not of the form name:base64");
      }
    }
    return m;
  } catch (const json::exception& e) {
    return Err(std::string("manifest field missing or of the wrong type: ") + e.what());
  }
}

std::int64_t GenerationCeiling(std::int64_t created_at_s) {
  // created_at_s > kGenerationEpoch > 0, so the difference cannot overflow.
  return created_at_s > kGenerationEpoch ? created_at_s - kGenerationEpoch : 0;
}

std::string UnixSecondsText(std::int64_t s) {
  // Years 0 to 9999; beyond that gmtime_r may fail or print more digits.
  constexpr std::int64_t kYear0 = -62167219200, kYear10000 = 253402300800;
  struct tm tm {};
  time_t t = static_cast<time_t>(s);
  if (s < kYear0 || s >= kYear10000 || ::gmtime_r(&t, &tm) == nullptr) {
    return "unix time " + std::to_string(s);
  }
  char buf[80];  // room for any int the compiler imagines
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  return buf;
}

Status CheckGenerationNumber(std::int64_t generation, std::int64_t created_at_s) {
  const std::string gen = "generation " + std::to_string(generation);
  if (generation < 1) return Err(gen + " is not a positive number; generations start at 1");
  const std::int64_t ceiling = GenerationCeiling(created_at_s);
  if (ceiling == 0) {
    return Err(gen + " is signed at " + UnixSecondsText(created_at_s) +
               ", before 2020-01-01T00:00:00Z, when no generation number is allowed; the "
               "signing operator's clock is wrong: set it (NTP) and publish again");
  }
  if (generation > ceiling) {
    return Err(gen + " is above the ceiling " + std::to_string(ceiling) +
               " for a manifest signed at " + UnixSecondsText(created_at_s) +
               " (one number per second since 2020-01-01T00:00:00Z); the number looks steered "
               "by the controller, which numbers generations from the highest one it reports: "
               "check the controller's generations for this machine before publishing again");
  }
  return Status::Ok();
}

SignedManifest SignManifest(const Manifest& m, const SecretKey& key) {
  SignedManifest sm;
  sm.manifest = ManifestToJson(m);
  sm.signer = key.public_key().ToText();
  sm.signature = Base64Encode(key.Sign(std::string(kSigDomain) + sm.manifest));
  return sm;
}

std::string VarsHash(std::string_view sealed_vars) {
  if (sealed_vars.empty()) return "";
  return "sha256:" + Sha256Hex(sealed_vars);
}

Result<Manifest> VerifySignedManifest(const SignedManifest& sm, const VerifyContext& ctx,
                                      std::string_view sealed_vars) {
  auto signer = ParsePublicKey(sm.signer);
  if (!signer) return Err("manifest signer: " + signer.message());
  // Identify the manifest for messages before trusting anything in it.
  auto peek = ParseManifest(sm.manifest);
  std::string what =
      peek ? "manifest for " + peek->machine + " generation " + std::to_string(peek->generation)
           : std::string("manifest");
  bool trusted = false;
  for (const auto& k : ctx.trusted_operators) trusted = trusted || k == *signer;
  if (!trusted) {
    return Err(what + " is signed by unknown key " + signer->ShortId() + " (" + sm.signer +
               "); add it to trustedOperatorKeys if that operator is trusted");
  }
  auto sig = Base64Decode(sm.signature);
  if (!sig || !VerifySignature(*signer, std::string(kSigDomain) + sm.manifest, *sig)) {
    return Err(what + " has an invalid signature by key " + signer->ShortId() +
               "; it was altered after signing");
  }
  if (!peek) return Err("signed manifest is invalid: " + peek.message());
  const Manifest& m = *peek;
  if (m.machine != ctx.machine) {
    return Err(what + " is addressed to machine '" + m.machine + "', not to this machine '" +
               ctx.machine + "'");
  }
  if (auto st = CheckGenerationNumber(m.generation, m.created_at); !st) {
    return Err(what + ": " + st.message());
  }
  if (m.generation <= ctx.last_applied) {
    return Err(what + " is not newer than generation " + std::to_string(ctx.last_applied) +
               " already accepted here; replayed or stale generations are refused (a rollback "
               "is published as a new, higher generation)");
  }
  // Equal times are fine (two publishes within one second); earlier is not.
  if (m.created_at < ctx.last_created_at) {
    std::string floor = ctx.last_applied > 0
                            ? "generation " + std::to_string(ctx.last_applied) +
                                  " accepted here, signed at " +
                                  UnixSecondsText(ctx.last_created_at)
                            : "this agent's floor " + UnixSecondsText(ctx.last_created_at) +
                                  " (when its machine key was created; no generation accepted "
                                  "yet)";
    return Err(what + " is signed at " + UnixSecondsText(m.created_at) + ", before " + floor +
               "; a controller is replaying an older manifest, or operators' clocks disagree — "
               "operators must keep their clocks synchronised (NTP) and publish again");
  }
  // A manifest from the future would hold back every later one until then.
  // The difference of two int64 values fits uint64 when it is positive.
  const std::uint64_t ahead =
      ctx.now_s && m.created_at > *ctx.now_s
          ? static_cast<std::uint64_t>(m.created_at) - static_cast<std::uint64_t>(*ctx.now_s)
          : 0;
  if (ahead > static_cast<std::uint64_t>(std::max<std::int64_t>(ctx.max_future_skew_s, 0))) {
    return Err(what + " is signed at " + UnixSecondsText(m.created_at) + ", " +
               std::to_string(ahead) + " s ahead of this machine's clock (" +
               UnixSecondsText(*ctx.now_s) + "; maxManifestFutureSkew is " +
               std::to_string(ctx.max_future_skew_s) +
               " s); accepting it would hold back every manifest signed before then. If this "
               "machine's clock is wrong, set it (NTP); otherwise the signing operator's clock "
               "is ahead: set it and publish again");
  }
  if (VarsHash(sealed_vars) != m.vars_hash) {
    return Err(what + ": the vars delivered do not match the signed vars hash (expected '" +
               m.vars_hash + "', got '" + VarsHash(sealed_vars) + "')");
  }
  return m;
}

}  // namespace muster
