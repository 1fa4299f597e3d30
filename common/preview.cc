#include "common/preview.h"

#include <algorithm>

namespace muster {

namespace {
constexpr std::string_view kPreviewDomain = "muster-preview-v1\n";
}  // namespace

SignedManifest SignPreview(Manifest m, const SecretKey& key) {
  m.generation = 1;
  m.action = Action::kDryActivate;
  m.vars_hash.clear();
  m.force = false;
  m.in_window = false;
  SignedManifest sm;
  sm.manifest = ManifestToJson(m);
  sm.signer = key.public_key().ToText();
  sm.signature = Base64Encode(key.Sign(std::string(kPreviewDomain) + sm.manifest));
  return sm;
}

Result<Manifest> VerifyPreview(const SignedManifest& sm, const PreviewVerifyContext& ctx) {
  auto signer = ParsePublicKey(sm.signer);
  if (!signer) return Err("preview signer: " + signer.message());
  bool trusted = false;
  for (const auto& k : ctx.trusted_operators) trusted = trusted || k == *signer;
  if (!trusted) {
    return Err("preview request is signed by unknown key " + signer->ShortId() +
               "; add it to trustedOperatorKeys if that operator is trusted");
  }
  auto sig = Base64Decode(sm.signature);
  if (!sig || !VerifySignature(*signer, std::string(kPreviewDomain) + sm.manifest, *sig)) {
    return Err("preview request has an invalid signature by key " + signer->ShortId() +
               " (altered after signing, or a deploy manifest passed off as a preview)");
  }
  auto m = ParseManifest(sm.manifest);
  if (!m) return Err("signed preview request is invalid: " + m.message());
  if (m->machine != ctx.machine) {
    return Err("preview request is addressed to machine '" + m->machine + "', not to '" +
               ctx.machine + "'");
  }
  if (m->action != Action::kDryActivate || !m->vars_hash.empty()) {
    return Err("preview request must be a dry-activate without vars");
  }
  if (m->created_at < ctx.now_s - ctx.max_age_s) {
    return Err("preview request signed at " + UnixSecondsText(m->created_at) + " is older than " +
               std::to_string(ctx.max_age_s) +
               " s (this machine's clock: " + UnixSecondsText(ctx.now_s) + "); ask again");
  }
  if (m->created_at > ctx.now_s + ctx.max_future_skew_s) {
    return Err("preview request is signed at " + UnixSecondsText(m->created_at) +
               ", ahead of this machine's clock (" + UnixSecondsText(ctx.now_s) +
               "); synchronise the clocks (NTP)");
  }
  return m;
}

bool PreviewReplayGuard::Seen(const std::string& signature) {
  if (std::find(recent_.begin(), recent_.end(), signature) != recent_.end()) return true;
  recent_.push_back(signature);
  while (recent_.size() > capacity_) recent_.pop_front();
  return false;
}

}  // namespace muster
