// Nix binary-cache metadata: narinfo files, Nix's base-32 hashes and its
// Ed25519 signing keys, as nix itself reads and writes them.
//
// A narinfo's signature covers Nix's fingerprint of the path,
//   "1;<storepath>;sha256:<nix32 narHash>;<narSize>;<refs as full store paths, sorted, ','>"
// (nix: src/libstore/path-info.cc ValidPathInfo::fingerprint); the URL,
// compression and file hash/size are not signed, so a cache may recompress.
// Key text forms are Nix's: secret "name:base64(64-byte Ed25519 secret key)",
// public "name:base64(32 bytes)", signature "name:base64(64 bytes)".
// Pure functions; thread-safe once InitCrypto() has returned.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/crypto.h"
#include "common/error.h"

namespace muster::nar {

// Nix's base-32 (alphabet 0-9a-z without e o u t, processed from the end).
std::string Nix32Encode(std::string_view bytes);
// Fails on a character outside the alphabet or a length that is not a whole
// number of bytes.
Result<std::string> Nix32Decode(std::string_view text, std::size_t bytes);

// Accepts a SHA-256 in any form nix prints: "sha256:<nix32>", "sha256:<hex>",
// "sha256-<base64>" (SRI). Returns the 32 raw bytes.
Result<std::string> ParseSha256(std::string_view text);
// "sha256:<nix32>", the form narinfos and fingerprints use.
std::string FormatSha256(std::string_view digest32);

// The 32-character hash part of "/nix/store/<hash>-<name>", or of a basename.
// Empty when the text is not a store path or basename.
std::string StorePathHash(std::string_view path);

struct NarInfo {
  std::string store_path;            // /nix/store/<hash>-<name>
  std::string url;                   // nar/<filehash>.nar.zst
  std::string compression = "zstd";  // zstd | xz | none
  std::string file_hash;             // sha256:<nix32> of the file at url
  std::uint64_t file_size = 0;
  std::string nar_hash;  // sha256:<nix32> of the uncompressed NAR
  std::uint64_t nar_size = 0;
  std::vector<std::string> references;  // basenames (<hash>-<name>), sorted
  std::string deriver;                  // basename or ""
  std::vector<std::string> sigs;        // "name:base64"
};

// Strict enough for input from a peer: StorePath, URL, NarHash and NarSize
// required, store paths checked, unknown keys ignored, at most 64 KiB.
Result<NarInfo> ParseNarInfo(std::string_view text);
// Text in nix's own field order.
std::string FormatNarInfo(const NarInfo& info);
// The signed fingerprint (see above).
std::string Fingerprint(const NarInfo& info);

// A Nix binary-cache signing key.
struct SigningKey {
  std::string name;
  SecretKey key;
};
// Parses a Nix secret key ("name:base64(64 bytes)", surrounding whitespace
// allowed). The error says which form was expected.
Result<SigningKey> ParseSigningKey(std::string_view text);
std::string SigningKeyText(const SigningKey& k);  // the secret form
std::string PublicKeyText(const SigningKey& k);   // "name:base64(32 bytes)"
SigningKey GenerateSigningKey(std::string name);

// "name:base64(signature over Fingerprint(info))".
std::string Sign(const NarInfo& info, const SigningKey& k);
// True when one of info.sigs is a valid signature by one of the public keys
// ("name:base64"); keys and signatures match by name as in nix.
bool HasValidSignature(const NarInfo& info, const std::vector<std::string>& public_keys);

// Incremental SHA-256 (OpenSSL), for NARs too large to hold.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(std::string_view bytes);
  std::string Final();  // 32 raw bytes; the object may not be updated afterwards

 private:
  void* ctx_;
};

}  // namespace muster::nar
