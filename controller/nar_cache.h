// The controller's binary cache: NARs and narinfos in Nix's binary-cache
// layout, on a ByteStorage, written so that nix on an agent can read them as
// it reads any HTTP cache:
//   nix-cache-info
//   <hash>.narinfo                       (signed by the operator's cache key)
//   nar/<hash>-<narhash>.nar.zst         (the store hash leads, so that a NAR
//   nar/<hash>-<narhash>.nar              request names the path it belongs to)
//   staging/<hash>-<narhash>.nar[.zst]   (uploads in progress, resumable)
// NARs arrive zstd-compressed, or as they are when the CLI found that they do
// not compress (Compression: none, which nix reads as well); each chunk is
// decompressed if need be and hashed as it is appended (a resumed or
// interleaved upload is instead read back once at commit), and Commit checks
// NarHash and NarSize and only then writes the narinfo, which is what makes a
// path visible. The compressed file itself is not hashed: FileHash is not
// signed and nix does not check it, so a zstd narinfo carries none (an
// uncompressed one names its NarHash). Nothing here trusts the uploader's word
// beyond the narinfo's signature, which nix checks on the agent. Thread-safe
// (one mutex around the index; I/O outside it where possible).
//
// Several controllers may share one storage (the fleet's PostgreSQL
// database). Each keeps its own index and learns what the others committed
// when it is asked for a path it lacks (Has, Read, Closure), and what they
// collected when a read finds the bytes gone; Stats and garbage collection
// first bring the whole index in line with storage.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/narinfo.h"
#include "controller/byte_storage.h"

namespace muster {

struct CacheStats {
  std::uint64_t paths = 0;
  std::uint64_t bytes = 0;         // narinfos + NARs (compressed)
  std::uint64_t nar_bytes = 0;     // uncompressed NAR sizes
  std::uint64_t staged_paths = 0;  // uploads in progress
  std::uint64_t staged_bytes = 0;
  std::uint64_t max_bytes = 0;
};

// How an uploaded NAR is encoded (narinfo "Compression:").
enum class NarCompression { kZstd, kNone };
// "zstd" / "none"; ParseNarCompression fails on anything else.
const char* NarCompressionName(NarCompression c);
Result<NarCompression> ParseNarCompression(std::string_view name);

class NarCache {
 public:
  // Largest chunk Append accepts and Read returns.
  static constexpr std::size_t kMaxChunk = 4 << 20;

  // Loads the index from storage (narinfos; unreadable ones are skipped and
  // logged) and writes nix-cache-info. max_bytes bounds committed plus staged bytes.
  static Result<std::unique_ptr<NarCache>> Open(std::unique_ptr<ByteStorage> storage,
                                                std::uint64_t max_bytes);
  ~NarCache();

  // Whether reading bytes waits for another machine (ByteStorage::Remote).
  bool RemoteStorage() const { return storage_->Remote(); }
  // Whether the store path (full path or hash) has a committed narinfo.
  bool Has(const std::string& path_or_hash);
  // Grows whenever the index changes (a commit here, or a path found that
  // another controller sharing the storage committed or collected): sets
  // derived from the index are stale when it moved.
  std::uint64_t Revision() const { return revision_.load(); }
  // Bytes of the staged upload for (path, narHash, compression) received so
  // far (0: none).
  std::uint64_t StagedOffset(const std::string& path, const std::string& nar_hash,
                             NarCompression c = NarCompression::kZstd);
  // Appends bytes of path's NAR, encoded as c, at offset; returns the new
  // offset. Refused: a bad path or hash, an offset other than StagedOffset,
  // more bytes than a NAR of nar_size encoded as c can take, a full cache or disk.
  Result<std::uint64_t> Append(const std::string& path, const std::string& nar_hash,
                               std::uint64_t nar_size, std::uint64_t offset, std::string_view bytes,
                               NarCompression c = NarCompression::kZstd);
  // Verifies the staged upload against info (StorePath, NarHash, NarSize,
  // References, Deriver, Sig, and Compression "zstd" or "none", which names
  // the staged upload; URL and file fields are set here), moves it into nar/
  // and writes the narinfo. A mismatch removes the staged bytes and says what
  // differed. Returns the narinfo as stored.
  Result<nar::NarInfo> Commit(nar::NarInfo info);

  // An object by its name in the cache layout ("nix-cache-info",
  // "<hash>.narinfo", "nar/…"): up to max_bytes from offset, and the object's
  // total size. Fails (not found) for any other name.
  Result<std::string> Read(const std::string& name, std::uint64_t offset, std::size_t max_bytes,
                           std::uint64_t* total);
  // The store hash an object belongs to ("" for nix-cache-info, and for a
  // name outside the layout).
  static std::string HashOfObject(const std::string& name);

  // Hashes of the closures of roots (store paths or hashes) as far as the
  // cache knows them (paths not in the cache end the walk there).
  std::set<std::string> Closure(const std::vector<std::string>& roots);

  CacheStats Stats();
  // What removing every committed path outside keep (hashes) and older than
  // grace_s would free, and (unless dry_run) removes them, plus staged uploads
  // older than grace_s. Returns {paths, bytes}.
  std::pair<std::uint64_t, std::uint64_t> CollectGarbage(const std::set<std::string>& keep,
                                                         std::int64_t grace_s, bool dry_run);

 private:
  struct Entry {
    std::vector<std::string> refs;  // hashes
    std::string nar_key;
    std::uint64_t file_size = 0;
    std::uint64_t nar_size = 0;
    std::uint64_t info_size = 0;
  };
  // Decompresses and hashes an upload as it arrives (defined in the .cc).
  struct Verifier;
  static constexpr std::size_t kMaxVerifiers = 8;  // uploads verified as they arrive, at once

  NarCache(std::unique_ptr<ByteStorage> s, std::uint64_t max);
  // The index entry for hash h as storage holds it (nullopt, *why set, when
  // its narinfo or NAR is missing or unreadable).
  std::optional<Entry> LoadEntry(const std::string& h, std::string* why);
  // Adds h to the index if storage holds it: another controller sharing the
  // storage may have committed it. True when h is (now) in the index.
  bool Discover(const std::string& h, bool log_skipped = false);
  // Drops h from the index (its bytes went: another controller collected it).
  void Forget(const std::string& h);
  // Brings the index in line with storage's narinfos (Open, Stats, GC).
  void Sync(bool log_skipped);
  static std::string StagingKey(const std::string& hash, const std::string& nar_hash_nix32,
                                NarCompression c);
  // The verifier of key if it has seen exactly `offset` bytes (removed from
  // the map: the caller owns it until it puts it back); nullptr otherwise.
  std::unique_ptr<Verifier> TakeVerifier(const std::string& key, std::uint64_t offset);
  // Forgets the staged object key of `size` bytes (discarded, promoted, collected).
  void DropStaged(const std::string& key, std::uint64_t size);

  std::unique_ptr<ByteStorage> storage_;
  std::uint64_t max_;
  std::mutex mu_;
  std::map<std::string, Entry> index_;  // store hash → entry
  std::uint64_t committed_bytes_ = 0;
  std::uint64_t staged_bytes_ = 0;  // a running total: no directory walk per chunk
  std::atomic<std::uint64_t> revision_{0};
  std::map<std::string, std::unique_ptr<Verifier>> verifiers_;  // staging key → verifier
};

// The upload-size bound for a NAR of nar_size bytes encoded as c (zstd's
// worst case plus per-frame slack; nar_size itself when uncompressed).
std::uint64_t MaxCompressedSize(std::uint64_t nar_size, NarCompression c = NarCompression::kZstd);

}  // namespace muster
