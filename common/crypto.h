// Keys, signatures, hashes and sealed boxes (libsodium).
//
// Text forms, chosen to be self-describing and copy-paste safe:
//   public key   "ed25519:<base64 of 32 bytes>"
//   fingerprint  "sha256:<64 lowercase hex>"  (SHA-256 of the 32 raw key bytes; the pin)
//   secret file  "muster-secret-key-v1 ed25519 <base64 of the 32-byte seed>\n", mode 0600
// All functions are thread-safe once InitCrypto() has returned.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace muster {

using Bytes = std::vector<std::uint8_t>;

// Initialises libsodium. Call once at start-up; safe to call again.
void InitCrypto();

std::string Base64Encode(std::string_view bytes);
Result<std::string> Base64Decode(std::string_view text);
std::string HexEncode(std::string_view bytes);
std::string Sha256Hex(std::string_view bytes);  // lowercase hex of SHA-256

struct PublicKey {
  std::array<std::uint8_t, 32> bytes{};
  std::string ToText() const;         // "ed25519:…"
  std::string Fingerprint() const;    // "sha256:…", used as the pin
  std::string ShortId() const;        // first 12 hex digits of the fingerprint, for messages
  std::string_view Raw() const {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
  }
  bool operator==(const PublicKey&) const = default;
};

// Parses "ed25519:<base64>". The error says what form was expected.
Result<PublicKey> ParsePublicKey(std::string_view text);
// Accepts "sha256:<hex>" (case-insensitive hex); returns it normalised.
Result<std::string> ParseFingerprint(std::string_view text);

class SecretKey {
 public:
  static SecretKey Generate();
  static Result<SecretKey> FromSeed(std::string_view seed32);
  const PublicKey& public_key() const { return pk_; }
  std::string_view seed() const {
    return {reinterpret_cast<const char*>(seed_.data()), seed_.size()};
  }
  // Detached Ed25519 signature (64 bytes).
  std::string Sign(std::string_view message) const;
  // Opens a sealed box addressed to this key's X25519 counterpart.
  Result<std::string> OpenSealed(std::string_view ciphertext) const;

  ~SecretKey();
  SecretKey(const SecretKey&) = default;
  SecretKey& operator=(const SecretKey&) = default;

 private:
  SecretKey() = default;
  std::array<std::uint8_t, 32> seed_{};
  std::array<std::uint8_t, 64> sk_{};
  PublicKey pk_;
};

bool VerifySignature(const PublicKey& key, std::string_view message, std::string_view signature);

// Seals plaintext to the X25519 key derived from an Ed25519 public key.
Result<std::string> SealTo(const PublicKey& recipient, std::string_view plaintext);

// Writes a new key file with mode 0600 (atomically; refuses to overwrite).
Status SaveSecretKey(const SecretKey& key, const std::filesystem::path& path);
// Loads a key file; refuses one that group or others may read or write.
Result<SecretKey> LoadSecretKey(const std::filesystem::path& path);
// Loads the key, creating it (and its directory, 0700) on first use.
Result<SecretKey> LoadOrCreateSecretKey(const std::filesystem::path& path);

}  // namespace muster
