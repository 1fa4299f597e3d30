#include "common/narinfo.h"

#include <openssl/evp.h>

#include <algorithm>
#include <charconv>

#include "common/manifest.h"

namespace muster::nar {

namespace {

constexpr std::string_view kAlphabet = "0123456789abcdfghijklmnpqrsvwxyz";
constexpr std::string_view kStoreDir = "/nix/store/";
constexpr std::size_t kMaxNarInfo = 64 * 1024;

bool ValidBasename(std::string_view b) {
  if (b.size() < 34 || b[32] != '-') return false;
  for (std::size_t i = 0; i < 32; ++i) {
    if (kAlphabet.find(b[i]) == std::string_view::npos) return false;
  }
  for (char c : b.substr(33)) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '-' || c == '.' || c == '_' || c == '?' || c == '=';
    if (!ok) return false;
  }
  return b.size() <= 32 + 1 + 211;
}

Result<std::uint64_t> ParseU64(std::string_view s, std::string_view what) {
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) {
    return Err(std::string(what) + " '" + std::string(s.substr(0, 40)) + "' is not a number");
  }
  return v;
}

}  // namespace

std::string Nix32Encode(std::string_view bytes) {
  if (bytes.empty()) return "";
  std::size_t len = (bytes.size() * 8 - 1) / 5 + 1;
  std::string out;
  out.reserve(len);
  for (std::size_t n = len; n-- > 0;) {
    std::size_t b = n * 5;
    std::size_t i = b / 8;
    std::size_t j = b % 8;
    unsigned c = static_cast<unsigned char>(bytes[i]) >> j;
    if (i + 1 < bytes.size())
      c |= static_cast<unsigned>(static_cast<unsigned char>(bytes[i + 1])) << (8 - j);
    out.push_back(kAlphabet[c & 0x1f]);
  }
  return out;
}

Result<std::string> Nix32Decode(std::string_view text, std::size_t bytes) {
  if (bytes == 0 || text.size() != (bytes * 8 - 1) / 5 + 1) {
    return Err("a base-32 hash of " + std::to_string(bytes) + " bytes has " +
               std::to_string((bytes * 8 - 1) / 5 + 1) + " characters, not " +
               std::to_string(text.size()));
  }
  std::string out(bytes, '\0');
  for (std::size_t n = 0; n < text.size(); ++n) {
    char ch = text[text.size() - n - 1];
    auto d = kAlphabet.find(ch);
    if (d == std::string_view::npos)
      return Err("'" + std::string(1, ch) + "' is not a base-32 digit");
    std::size_t b = n * 5;
    std::size_t i = b / 8;
    std::size_t j = b % 8;
    out[i] = static_cast<char>(static_cast<unsigned char>(out[i]) | ((d << j) & 0xff));
    unsigned carry = static_cast<unsigned>(d >> (8 - j));
    if (i + 1 < bytes) {
      out[i + 1] = static_cast<char>(static_cast<unsigned char>(out[i + 1]) | carry);
    } else if (carry) {
      return Err("base-32 hash has bits beyond its length");
    }
  }
  return out;
}

Result<std::string> ParseSha256(std::string_view text) {
  if (text.rfind("sha256-", 0) == 0) {
    auto raw = Base64Decode(text.substr(7));
    if (!raw || raw->size() != 32)
      return Err("'" + std::string(text) + "' is not a SHA-256 SRI hash");
    return raw;
  }
  if (text.rfind("sha256:", 0) != 0) {
    return Err("hash '" + std::string(text.substr(0, 80)) + "' must be sha256:… or sha256-…");
  }
  std::string_view v = text.substr(7);
  if (v.size() == 64) {
    std::string out;
    for (std::size_t i = 0; i < 64; i += 2) {
      unsigned x = 0;
      auto [p, ec] = std::from_chars(v.data() + i, v.data() + i + 2, x, 16);
      if (ec != std::errc() || p != v.data() + i + 2)
        return Err("bad hex in hash '" + std::string(text) + "'");
      out.push_back(static_cast<char>(x));
    }
    return out;
  }
  auto raw = Nix32Decode(v, 32);
  if (!raw) return Err("hash '" + std::string(text.substr(0, 80)) + "': " + raw.message());
  return raw;
}

std::string FormatSha256(std::string_view digest32) { return "sha256:" + Nix32Encode(digest32); }

std::string StorePathHash(std::string_view path) {
  if (path.rfind(kStoreDir, 0) == 0) path.remove_prefix(kStoreDir.size());
  if (!ValidBasename(path)) return "";
  return std::string(path.substr(0, 32));
}

Result<NarInfo> ParseNarInfo(std::string_view text) {
  if (text.size() > kMaxNarInfo) return Err("narinfo larger than 64 KiB");
  NarInfo info;
  bool have_refs = false;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty()) continue;
    std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) return Err("narinfo line without 'Key: value'");
    std::string_view k = line.substr(0, colon);
    std::string_view rest = line.substr(colon + 1);
    if (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
    std::string v(rest);
    if (k == "StorePath") {
      info.store_path = v;
    } else if (k == "URL") {
      info.url = v;
    } else if (k == "Compression") {
      info.compression = v;
    } else if (k == "FileHash") {
      info.file_hash = v;
    } else if (k == "FileSize") {
      auto n = ParseU64(v, "FileSize");
      if (!n) return n.error();
      info.file_size = *n;
    } else if (k == "NarHash") {
      info.nar_hash = v;
    } else if (k == "NarSize") {
      auto n = ParseU64(v, "NarSize");
      if (!n) return n.error();
      info.nar_size = *n;
    } else if (k == "References") {
      have_refs = true;
      std::size_t p = 0;
      while (p < v.size()) {
        std::size_t sp = v.find(' ', p);
        if (sp == std::string::npos) sp = v.size();
        if (sp > p) info.references.push_back(v.substr(p, sp - p));
        p = sp + 1;
      }
    } else if (k == "Deriver") {
      if (v != "unknown-deriver") info.deriver = v;
    } else if (k == "Sig") {
      info.sigs.push_back(v);
    }
  }
  (void)have_refs;
  if (info.store_path.empty() || info.url.empty() || info.nar_hash.empty() || info.nar_size == 0) {
    return Err("narinfo lacks StorePath, URL, NarHash or NarSize");
  }
  if (auto st = ValidateStorePath(info.store_path); !st) return st.error();
  if (StorePathHash(info.store_path).empty()) return Err("narinfo StorePath is not a store path");
  for (const auto& r : info.references) {
    if (!ValidBasename(r))
      return Err("narinfo reference '" + r.substr(0, 80) + "' is not a store path");
  }
  if (!info.deriver.empty() && !ValidBasename(info.deriver))
    return Err("narinfo Deriver is not a store path");
  auto nh = ParseSha256(info.nar_hash);
  if (!nh) return Err("narinfo NarHash: " + nh.message());
  info.nar_hash = FormatSha256(*nh);
  std::sort(info.references.begin(), info.references.end());
  return info;
}

std::string FormatNarInfo(const NarInfo& info) {
  std::string s;
  s += "StorePath: " + info.store_path + "\n";
  s += "URL: " + info.url + "\n";
  s += "Compression: " + info.compression + "\n";
  if (!info.file_hash.empty()) s += "FileHash: " + info.file_hash + "\n";
  if (info.file_size) s += "FileSize: " + std::to_string(info.file_size) + "\n";
  s += "NarHash: " + info.nar_hash + "\n";
  s += "NarSize: " + std::to_string(info.nar_size) + "\n";
  s += "References: ";  // as nix writes it: a trailing space when there are none
  for (std::size_t i = 0; i < info.references.size(); ++i) {
    if (i) s += " ";
    s += info.references[i];
  }
  s += "\n";
  if (!info.deriver.empty()) s += "Deriver: " + info.deriver + "\n";
  for (const auto& sig : info.sigs) s += "Sig: " + sig + "\n";
  return s;
}

std::string Fingerprint(const NarInfo& info) {
  std::vector<std::string> refs = info.references;
  std::sort(refs.begin(), refs.end());
  std::string s =
      "1;" + info.store_path + ";" + info.nar_hash + ";" + std::to_string(info.nar_size) + ";";
  for (std::size_t i = 0; i < refs.size(); ++i) {
    if (i) s += ",";
    s += std::string(kStoreDir) + refs[i];
  }
  return s;
}

Result<SigningKey> ParseSigningKey(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r'))
    text.remove_suffix(1);
  while (!text.empty() && (text.front() == ' ' || text.front() == '\n')) text.remove_prefix(1);
  auto colon = text.find(':');
  const char* form =
      "a Nix secret signing key ('name:base64', from 'muster key generate --cache' "
      "or 'nix-store --generate-binary-cache-key')";
  if (colon == std::string_view::npos || colon == 0) return Err(std::string("expected ") + form);
  auto raw = Base64Decode(text.substr(colon + 1));
  if (!raw || raw->size() != 64)
    return Err(std::string("expected ") + form + "; the key is not 64 bytes of base64");
  auto sk = SecretKey::FromSeed(std::string_view(*raw).substr(0, 32));
  if (!sk) return sk.error();
  if (sk->public_key().Raw() != std::string_view(*raw).substr(32)) {
    return Err("the secret signing key's public half does not match its seed (corrupt key file)");
  }
  return SigningKey{std::string(text.substr(0, colon)), *sk};
}

std::string SigningKeyText(const SigningKey& k) {
  return k.name + ":" +
         Base64Encode(std::string(k.key.seed()) + std::string(k.key.public_key().Raw()));
}

std::string PublicKeyText(const SigningKey& k) {
  return k.name + ":" + Base64Encode(k.key.public_key().Raw());
}

SigningKey GenerateSigningKey(std::string name) {
  return SigningKey{std::move(name), SecretKey::Generate()};
}

std::string Sign(const NarInfo& info, const SigningKey& k) {
  return k.name + ":" + Base64Encode(k.key.Sign(Fingerprint(info)));
}

bool HasValidSignature(const NarInfo& info, const std::vector<std::string>& public_keys) {
  std::string fp = Fingerprint(info);
  for (const auto& sig : info.sigs) {
    auto sc = sig.find(':');
    if (sc == std::string::npos) continue;
    for (const auto& pk : public_keys) {
      auto pc = pk.find(':');
      if (pc == std::string::npos || pk.substr(0, pc) != sig.substr(0, sc)) continue;
      auto raw = Base64Decode(std::string_view(pk).substr(pc + 1));
      auto s = Base64Decode(std::string_view(sig).substr(sc + 1));
      if (!raw || raw->size() != 32 || !s || s->size() != 64) continue;
      PublicKey key;
      std::copy(raw->begin(), raw->end(), key.bytes.begin());
      if (VerifySignature(key, fp, *s)) return true;
    }
  }
  return false;
}

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr);
}
Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }
void Sha256::Update(std::string_view bytes) {
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), bytes.data(), bytes.size());
}
std::string Sha256::Final() {
  unsigned char out[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), out, &n);
  return std::string(reinterpret_cast<char*>(out), n);
}

}  // namespace muster::nar
