// ParseManifest and VerifySignedManifest on arbitrary manifest text.
//
// The input is parsed as is, then verified three ways: signed by a trusted
// operator key (so verification reaches the machine, generation and vars
// checks), with the input's tail as the signature (garbage base64), and signed
// by an untrusted key. Accepted manifests must round-trip through
// ManifestToJson.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/crypto.h"
#include "common/manifest.h"

namespace {
using namespace muster;

const SecretKey& Trusted() {
  static const SecretKey k = SecretKey::FromSeed("muster-fuzz-trusted-operator-001").value();
  return k;
}
const SecretKey& Untrusted() {
  static const SecretKey k = SecretKey::FromSeed("muster-fuzz-untrusted-operator-1").value();
  return k;
}
constexpr std::string_view kDomain = "muster-manifest-v1\n";  // as in manifest.cc
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  InitCrypto();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);

  auto parsed = ParseManifest(text);
  if (parsed.ok()) {
    std::string json = ManifestToJson(*parsed);
    auto again = ParseManifest(json);
    if (!again.ok() || ManifestToJson(*again) != json) {
      std::fprintf(stderr, "manifest does not round-trip: %s\n", json.c_str());
      std::abort();
    }
  }

  VerifyContext ctx{"web1", {Trusted().public_key()}, 3};
  ctx.last_created_at = 1700000000;
  ctx.now_s = 1800000000;
  SignedManifest sm{text, Trusted().public_key().ToText(),
                    Base64Encode(Trusted().Sign(std::string(kDomain) + text))};
  std::string_view vars = size > 0 && (data[0] & 1) ? std::string_view("sealed") : "";
  auto verified = VerifySignedManifest(sm, ctx, vars);
  if (verified.ok() &&
      (!parsed.ok() || verified->machine != "web1" || verified->generation <= 3 ||
       verified->vars_hash != VarsHash(vars) || verified->created_at < ctx.last_created_at ||
       verified->created_at > *ctx.now_s + ctx.max_future_skew_s ||
       !CheckGenerationNumber(verified->generation, verified->created_at).ok())) {
    std::abort();  // accepted something the rules refuse
  }

  SignedManifest garbage{text, sm.signer, text.substr(size / 2)};
  auto g = VerifySignedManifest(garbage, ctx, vars);
  if (g.ok() && garbage.signature != sm.signature) std::abort();  // forged

  SignedManifest stranger{text, Untrusted().public_key().ToText(),
                          Base64Encode(Untrusted().Sign(std::string(kDomain) + text))};
  if (VerifySignedManifest(stranger, ctx, vars).ok()) std::abort();  // untrusted key accepted
  return 0;
}
