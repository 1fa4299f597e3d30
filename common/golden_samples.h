// Deterministic sample values behind the golden files in tests/data (test-only).
//
// Everything here is reproducible byte for byte: keys come from fixed seeds,
// Ed25519 signatures are deterministic, and the sealed vars use an ephemeral key
// derived from a fixed seed (same format as crypto_box_seal, which the agent opens
// with SecretKey::OpenSealed). Regenerate the files with MUSTER_UPDATE_GOLDEN=1.
#pragma once

#include <sodium.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/crypto.h"
#include "common/manifest.h"
#include "common/preview.h"
#include "common/protocol.h"
#include "common/vars_bundle.h"

namespace muster::testing {

inline SecretKey GoldenOperatorKey() {
  return SecretKey::FromSeed("muster-golden-operator-seed-0001").value();
}
inline SecretKey GoldenMachineKey() {
  return SecretKey::FromSeed("muster-golden-machine-seed-00001").value();
}

// crypto_box_seal with a caller-chosen ephemeral key (tests only: a real seal
// must use a fresh random ephemeral key).
inline std::string DeterministicSeal(const PublicKey& recipient, std::string_view plaintext,
                                     std::string_view seed32) {
  unsigned char rpk[crypto_box_PUBLICKEYBYTES];
  unsigned char epk[crypto_box_PUBLICKEYBYTES];
  unsigned char esk[crypto_box_SECRETKEYBYTES];
  unsigned char nonce[crypto_box_NONCEBYTES];
  if (crypto_sign_ed25519_pk_to_curve25519(rpk, recipient.bytes.data()) != 0) std::abort();
  crypto_box_seed_keypair(epk, esk, reinterpret_cast<const unsigned char*>(seed32.data()));
  crypto_generichash_state st;
  crypto_generichash_init(&st, nullptr, 0, sizeof nonce);
  crypto_generichash_update(&st, epk, sizeof epk);
  crypto_generichash_update(&st, rpk, sizeof rpk);
  crypto_generichash_final(&st, nonce, sizeof nonce);
  std::string out(sizeof epk + crypto_box_MACBYTES + plaintext.size(), '\0');
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  std::copy(epk, epk + sizeof epk, o);
  if (crypto_box_easy(o + sizeof epk, reinterpret_cast<const unsigned char*>(plaintext.data()),
                      plaintext.size(), nonce, rpk, esk) != 0) {
    std::abort();
  }
  sodium_memzero(esk, sizeof esk);
  return out;
}

inline VarsBundle GoldenVarsBundle() {
  VarsBundle b;
  b.files.push_back({"key.txt", 0400, "root", "root",
                     "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n"});
  b.files.push_back({"activation/web1/db-password", 0440, "root", "postgres", "hunter2\n"});
  b.files.push_back(
      {"activation/web1/tls/cert.pem", 0644, "nginx", "nginx",
       std::string("-----BEGIN CERTIFICATE-----\n") + std::string("\x00\x01\xfe\xff", 4)});
  return b;
}

inline std::string GoldenSealedVars() {
  return DeterministicSeal(GoldenMachineKey().public_key(), EncodeVarsBundle(GoldenVarsBundle()),
                           "muster-golden-ephemeral-seed-001");
}

inline Manifest GoldenManifest() {
  Manifest m;
  m.machine = "web1";
  m.generation = 12;
  m.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-24.05";
  m.kind = Kind::kNixos;
  m.action = Action::kSwitch;
  m.substituters = {"https://cache.nixos.org", "https://cache.example.org"};
  m.trusted_public_keys = {"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
                           "cache.example.org-1:AAAAC3NzaC1lZDI1NTE5AAAAIMusterExampleKey0="};
  m.vars_hash = VarsHash(GoldenSealedVars());
  m.created_at = 1717200000;
  m.force = false;
  m.rollout = "";
  return m;
}

inline proto::Deploy GoldenDeploy() {
  proto::Deploy d;
  d.manifest = SignManifest(GoldenManifest(), GoldenOperatorKey());
  d.vars = Base64Encode(GoldenSealedVars());
  return d;
}

inline proto::Preview GoldenPreview() {
  Manifest m = GoldenManifest();
  m.created_at = 1717200000;
  return proto::Preview{"p1a2b3c4", SignPreview(m, GoldenOperatorKey())};
}

}  // namespace muster::testing
