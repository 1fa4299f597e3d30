#include "controller/nar_cache.h"

#include <spdlog/spdlog.h>
#include <zstd.h>

#include <ctime>
#include <deque>

namespace muster {

namespace {

constexpr std::string_view kCacheInfo = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";
constexpr std::size_t kVerifyChunk = 1 << 20;

std::string Nix32Of(const std::string& nar_hash) {
  auto raw = nar::ParseSha256(nar_hash);
  return raw ? nar::Nix32Encode(*raw) : "";
}

}  // namespace

const char* NarCompressionName(NarCompression c) {
  return c == NarCompression::kNone ? "none" : "zstd";
}

Result<NarCompression> ParseNarCompression(std::string_view name) {
  if (name == "zstd") return NarCompression::kZstd;
  if (name == "none") return NarCompression::kNone;
  return Err("compression '" + std::string(name.substr(0, 40)) +
             "' is not one the controller stores; use zstd or none");
}

struct NarCache::Verifier {
  Verifier(std::uint64_t size, NarCompression c)
      : nar_size(size), compression(c), dctx(nullptr, ZSTD_freeDCtx) {
    if (c == NarCompression::kZstd) {
      dctx.reset(ZSTD_createDCtx());
      out.assign(ZSTD_DStreamOutSize(), '\0');
    }
  }

  // Feeds the next bytes as uploaded; the first problem found is kept in error.
  void Feed(std::string_view chunk) {
    offset += chunk.size();
    if (!error.empty()) return;
    if (compression == NarCompression::kNone) return Hash(chunk);
    ZSTD_inBuffer in{chunk.data(), chunk.size(), 0};
    while (in.pos < in.size) {
      ZSTD_outBuffer o{out.data(), out.size(), 0};
      last = ZSTD_decompressStream(dctx.get(), &o, &in);
      if (ZSTD_isError(last)) {
        error = std::string("is not valid zstd (") + ZSTD_getErrorName(last) + ")";
        return;
      }
      Hash(std::string_view(out.data(), o.pos));
      if (!error.empty()) return;
    }
  }

  // NAR bytes: counted against narSize and hashed.
  void Hash(std::string_view nar) {
    nar_bytes += nar.size();
    if (nar_bytes > nar_size) {
      error = "is larger than its narSize " + std::to_string(nar_size);
      return;
    }
    nar_sha.Update(nar);
  }

  std::uint64_t nar_size;
  NarCompression compression;
  std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> dctx;
  std::string out;
  nar::Sha256 nar_sha;
  std::uint64_t offset = 0;  // compressed bytes fed
  std::uint64_t nar_bytes = 0;
  std::size_t last = 0;  // ZSTD_decompressStream's last answer: 0 at the end of a frame
  std::string error;
};

NarCache::NarCache(std::unique_ptr<ByteStorage> s, std::uint64_t max)
    : storage_(std::move(s)), max_(max) {}
NarCache::~NarCache() = default;

std::unique_ptr<NarCache::Verifier> NarCache::TakeVerifier(const std::string& key,
                                                           std::uint64_t offset) {
  std::lock_guard lock(mu_);
  auto it = verifiers_.find(key);
  if (it == verifiers_.end()) return nullptr;
  std::unique_ptr<Verifier> v = std::move(it->second);
  verifiers_.erase(it);
  if (v->offset != offset) return nullptr;
  return v;
}

void NarCache::DropStaged(const std::string& key, std::uint64_t size) {
  std::lock_guard lock(mu_);
  staged_bytes_ -= std::min(staged_bytes_, size);
  verifiers_.erase(key);
}

std::uint64_t MaxCompressedSize(std::uint64_t nar_size, NarCompression c) {
  if (c == NarCompression::kNone) return nar_size;
  // Each chunk the CLI compresses may start a frame; allow one header per KiB.
  return ZSTD_compressBound(static_cast<std::size_t>(nar_size)) + nar_size / 1024 + 4096;
}

std::string NarCache::StagingKey(const std::string& hash, const std::string& nar_hash_nix32,
                                 NarCompression c) {
  return "staging/" + hash + "-" + nar_hash_nix32 +
         (c == NarCompression::kNone ? ".nar" : ".nar.zst");
}

Result<std::unique_ptr<NarCache>> NarCache::Open(std::unique_ptr<ByteStorage> storage,
                                                 std::uint64_t max_bytes) {
  std::unique_ptr<NarCache> c(new NarCache(std::move(storage), max_bytes));
  if (auto st = c->storage_->Put("nix-cache-info", kCacheInfo); !st) return st.error();
  c->Sync(true);
  for (const auto& e : c->storage_->List("staging/")) c->staged_bytes_ += e.size;
  return c;
}

std::optional<NarCache::Entry> NarCache::LoadEntry(const std::string& h, std::string* why) {
  auto text = storage_->Read(h + ".narinfo", 0, 64 * 1024);
  auto info = text ? nar::ParseNarInfo(*text) : Result<nar::NarInfo>(text.error());
  if (!info) {
    *why = info.message();
    return std::nullopt;
  }
  auto nar_size = storage_->Size(info->url);
  if (!nar_size) {
    *why = "its NAR " + info->url + " is missing";
    return std::nullopt;
  }
  Entry en;
  for (const auto& r : info->references) en.refs.push_back(r.substr(0, 32));
  en.nar_key = info->url;
  en.file_size = *nar_size;
  en.nar_size = info->nar_size;
  en.info_size = text->size();
  return en;
}

bool NarCache::Discover(const std::string& h, bool log_skipped) {
  if (h.size() != 32) return false;
  std::string why;
  auto en = LoadEntry(h, &why);
  if (!en) {
    if (log_skipped) spdlog::warn("cache: skipping {}.narinfo: {}", h, why);
    return false;
  }
  std::lock_guard lock(mu_);
  if (index_.count(h)) return true;
  committed_bytes_ += en->file_size + en->info_size;
  index_[h] = std::move(*en);
  revision_.fetch_add(1);
  return true;
}

void NarCache::Forget(const std::string& h) {
  std::lock_guard lock(mu_);
  auto it = index_.find(h);
  if (it == index_.end()) return;
  committed_bytes_ -= std::min(committed_bytes_, it->second.file_size + it->second.info_size);
  index_.erase(it);
  revision_.fetch_add(1);
}

void NarCache::Sync(bool log_skipped) {
  std::set<std::string> listed;
  for (const auto& e : storage_->List("")) {
    if (e.key.find('/') != std::string::npos || e.key.size() != 32 + 8 ||
        e.key.substr(32) != ".narinfo") {
      continue;
    }
    std::string h = e.key.substr(0, 32);
    listed.insert(h);
    bool known;
    {
      std::lock_guard lock(mu_);
      known = index_.count(h) > 0;
    }
    if (!known) Discover(h, log_skipped);
  }
  // Paths another controller sharing the storage collected.
  std::lock_guard lock(mu_);
  for (auto it = index_.begin(); it != index_.end();) {
    if (listed.count(it->first)) {
      ++it;
      continue;
    }
    committed_bytes_ -= std::min(committed_bytes_, it->second.file_size + it->second.info_size);
    it = index_.erase(it);
    revision_.fetch_add(1);
  }
}

bool NarCache::Has(const std::string& path_or_hash) {
  std::string h = path_or_hash.size() == 32 ? path_or_hash : nar::StorePathHash(path_or_hash);
  {
    std::lock_guard lock(mu_);
    if (index_.count(h)) return true;
  }
  // Committed by another controller sharing the storage, perhaps.
  return Discover(h);
}

std::uint64_t NarCache::StagedOffset(const std::string& path, const std::string& nar_hash,
                                     NarCompression c) {
  std::string h = nar::StorePathHash(path);
  std::string n = Nix32Of(nar_hash);
  if (h.empty() || n.empty()) return 0;
  return storage_->Size(StagingKey(h, n, c)).value_or(0);
}

Result<std::uint64_t> NarCache::Append(const std::string& path, const std::string& nar_hash,
                                       std::uint64_t nar_size, std::uint64_t offset,
                                       std::string_view bytes, NarCompression c) {
  std::string h = nar::StorePathHash(path);
  if (h.empty()) return Err("'" + path.substr(0, 120) + "' is not a store path");
  std::string n = Nix32Of(nar_hash);
  if (n.empty()) return Err("narHash '" + nar_hash.substr(0, 80) + "' is not a SHA-256");
  if (nar_size == 0) return Err("narSize must be positive");
  if (bytes.size() > kMaxChunk) return Err("upload chunk larger than 4 MiB");
  std::string key = StagingKey(h, n, c);
  if (offset + bytes.size() > MaxCompressedSize(nar_size, c)) {
    auto had = storage_->Size(key);
    storage_->Remove(key).ok();
    DropStaged(key, had.value_or(0));
    return Err("upload of " + path + " is larger than " +
               (c == NarCompression::kNone ? "an uncompressed" : "a compressed") + " NAR of " +
               std::to_string(nar_size) +
               " bytes can be; refused and discarded (is narSize right?)");
  }
  {
    std::lock_guard lock(mu_);
    if (index_.count(h)) return Err(path + " is already in the cache");
    if (committed_bytes_ + staged_bytes_ + bytes.size() > max_) {
      return Err("the controller's cache is full (" +
                 std::to_string(committed_bytes_ + staged_bytes_) + " of " + std::to_string(max_) +
                 " bytes); run 'muster cache gc' or raise the controller's --cache-max-bytes");
    }
    staged_bytes_ += bytes.size();  // reserved; given back below if the write fails
  }
  auto r = storage_->Append(key, offset, bytes);
  if (!r) {
    {
      std::lock_guard lock(mu_);
      staged_bytes_ -= std::min<std::uint64_t>(staged_bytes_, bytes.size());
    }
    if (r.message().find(kDiskFullNote) != std::string::npos) {
      // Resuming cannot help until space is freed, and the partial upload
      // would keep every other upload from fitting: give its room back.
      storage_->Remove(key).ok();
      DropStaged(key, offset);
      return Err("the controller's disk is full: " + r.message() + "; the upload of " + path +
                 " was discarded, nothing was added to the cache");
    }
    return r;
  }
  // Verify as it arrives: Commit then needs no second pass over the bytes.
  std::unique_ptr<Verifier> v = TakeVerifier(key, offset);
  if (!v && offset == 0) v = std::make_unique<Verifier>(nar_size, c);
  if (v && v->nar_size == nar_size) {
    v->Feed(bytes);
    std::lock_guard lock(mu_);
    if (verifiers_.size() >= kMaxVerifiers) verifiers_.erase(verifiers_.begin());
    verifiers_[key] = std::move(v);
  }
  return r;
}

Result<nar::NarInfo> NarCache::Commit(nar::NarInfo info) {
  std::string h = nar::StorePathHash(info.store_path);
  if (h.empty()) return Err("'" + info.store_path.substr(0, 120) + "' is not a store path");
  auto want = nar::ParseSha256(info.nar_hash);
  if (!want) return Err("narHash: " + want.message());
  info.nar_hash = nar::FormatSha256(*want);
  auto compression = ParseNarCompression(info.compression);
  if (!compression) return compression.error();
  std::string staging = StagingKey(h, nar::Nix32Encode(*want), *compression);
  auto staged_size = storage_->Size(staging);
  if (!staged_size) return Err("nothing was uploaded for " + info.store_path + "; upload it first");
  {
    std::lock_guard lock(mu_);
    if (index_.count(h)) return Err(info.store_path + " is already in the cache");
  }
  auto discard = [&](const std::string& why) -> Error {
    storage_->Remove(staging).ok();
    DropStaged(staging, *staged_size);
    return Err(why + "; the upload was discarded, nothing was added to the cache");
  };
  // The bytes were verified as they arrived, unless the upload was resumed
  // after a restart (or its verifier was evicted): then read them back once.
  std::unique_ptr<Verifier> v = TakeVerifier(staging, *staged_size);
  if (!v || v->nar_size != info.nar_size) {
    v = std::make_unique<Verifier>(info.nar_size, *compression);
    for (std::uint64_t off = 0; off < *staged_size && v->error.empty();) {
      auto chunk = storage_->Read(staging, off, kVerifyChunk);
      if (!chunk) return Err("reading the upload of " + info.store_path + ": " + chunk.message());
      if (chunk->empty()) break;
      off += chunk->size();
      v->Feed(*chunk);
    }
  }
  if (!v->error.empty()) return discard("the upload of " + info.store_path + " " + v->error);
  if (v->last != 0) return discard("the upload of " + info.store_path + " is truncated");
  if (v->nar_bytes != info.nar_size) {
    return discard("the upload of " + info.store_path + " has " + std::to_string(v->nar_bytes) +
                   " bytes, its narSize says " + std::to_string(info.nar_size));
  }
  std::string got = v->nar_sha.Final();
  if (got != *want) {
    return discard("the upload of " + info.store_path + " has NAR hash " + nar::FormatSha256(got) +
                   ", not " + info.nar_hash);
  }
  // Named by the NAR hash: the file hash would cost a second pass over the
  // bytes, and nix checks neither it nor the URL (both are unsigned).
  std::string nh = nar::Nix32Encode(*want);
  info.compression = NarCompressionName(*compression);
  info.file_hash = *compression == NarCompression::kNone ? info.nar_hash : "";
  info.file_size = *staged_size;
  info.url = "nar/" + h + "-" + nh + (*compression == NarCompression::kNone ? ".nar" : ".nar.zst");
  std::string text = nar::FormatNarInfo(info);
  if (auto st = storage_->Promote(staging, info.url); !st) return st.error();
  if (auto st = storage_->Put(h + ".narinfo", text); !st) {
    storage_->Remove(info.url).ok();  // the staged bytes went with the rename
    DropStaged(staging, *staged_size);
    return st.error();
  }
  DropStaged(staging, *staged_size);
  Entry en;
  for (const auto& r : info.references) en.refs.push_back(r.substr(0, 32));
  en.nar_key = info.url;
  en.file_size = info.file_size;
  en.nar_size = info.nar_size;
  en.info_size = text.size();
  std::lock_guard lock(mu_);
  if (!index_.count(h)) committed_bytes_ += en.file_size + en.info_size;
  index_[h] = std::move(en);
  revision_.fetch_add(1);
  return info;
}

std::string NarCache::HashOfObject(const std::string& name) {
  if (name.size() == 40 && name.substr(32) == ".narinfo")
    return nar::StorePathHash(name.substr(0, 32) + "-x");
  if (name.rfind("nar/", 0) == 0 && name.size() > 4 + 33) {
    std::string h = nar::StorePathHash(name.substr(4, 32) + "-x");
    if (!h.empty() && name[4 + 32] == '-' && ValidStorageKey(name)) return h;
  }
  return "";
}

Result<std::string> NarCache::Read(const std::string& name, std::uint64_t offset,
                                   std::size_t max_bytes, std::uint64_t* total) {
  bool known = name == "nix-cache-info";
  std::string h = HashOfObject(name);
  if (!h.empty() && Has(h)) {  // Has finds a path committed through another controller
    std::lock_guard lock(mu_);
    auto it = index_.find(h);
    known = it != index_.end() && (name.back() == 'o' || it->second.nar_key == name);
  }
  if (!known) return Err("not found");
  auto size = storage_->Size(name);
  if (!size) {
    // Collected by another controller sharing the storage.
    if (!h.empty()) Forget(h);
    return Err("not found");
  }
  *total = *size;
  if (offset >= *size) return std::string();
  return storage_->Read(name, offset, std::min(max_bytes, kMaxChunk));
}

std::set<std::string> NarCache::Closure(const std::vector<std::string>& roots) {
  std::set<std::string> out;
  std::deque<std::string> todo;
  for (const auto& r : roots) {
    std::string h = r.size() == 32 ? r : nar::StorePathHash(r);
    if (!h.empty()) todo.push_back(h);
  }
  std::unique_lock lock(mu_);
  while (!todo.empty()) {
    std::string h = std::move(todo.front());
    todo.pop_front();
    if (!out.insert(h).second) continue;
    auto it = index_.find(h);
    if (it == index_.end()) {
      // Perhaps committed by another controller sharing the storage.
      lock.unlock();
      bool found = Discover(h);
      lock.lock();
      if (!found || (it = index_.find(h)) == index_.end()) continue;
    }
    for (const auto& r : it->second.refs) {
      if (!out.count(r)) todo.push_back(r);
    }
  }
  return out;
}

CacheStats NarCache::Stats() {
  Sync(false);
  CacheStats s;
  for (const auto& e : storage_->List("staging/")) {
    ++s.staged_paths;
    s.staged_bytes += e.size;
  }
  std::lock_guard lock(mu_);
  s.paths = index_.size();
  s.bytes = committed_bytes_;
  for (const auto& [h, e] : index_) s.nar_bytes += e.nar_size;
  s.max_bytes = max_;
  return s;
}

std::pair<std::uint64_t, std::uint64_t> NarCache::CollectGarbage(const std::set<std::string>& keep,
                                                                 std::int64_t grace_s,
                                                                 bool dry_run) {
  Sync(false);
  std::int64_t now = static_cast<std::int64_t>(std::time(nullptr));
  // Paths uploaded within the grace period stay: their generation may not be
  // published yet.
  std::set<std::string> young;
  for (const auto& e : storage_->List("")) {
    if (e.key.size() == 40 && e.key.find('/') == std::string::npos && now - e.mtime < grace_s) {
      young.insert(e.key.substr(0, 32));
    }
  }
  std::vector<std::pair<std::string, Entry>> doomed;
  {
    std::lock_guard lock(mu_);
    for (const auto& [h, e] : index_) {
      if (!keep.count(h) && !young.count(h)) doomed.emplace_back(h, e);
    }
    if (!dry_run) {
      for (const auto& [h, e] : doomed) {
        index_.erase(h);
        committed_bytes_ -= e.file_size + e.info_size;
      }
    }
  }
  std::uint64_t bytes = 0, paths = doomed.size();
  for (const auto& [h, e] : doomed) {
    bytes += e.file_size + e.info_size;
    if (dry_run) continue;
    // The narinfo first: a path is never visible without its NAR.
    storage_->Remove(h + ".narinfo").ok();
    storage_->Remove(e.nar_key).ok();
  }
  for (const auto& e : storage_->List("staging/")) {
    if (now - e.mtime < grace_s) continue;
    bytes += e.size;
    if (!dry_run && storage_->Remove(e.key).ok()) DropStaged(e.key, e.size);
  }
  return {paths, bytes};
}

}  // namespace muster
