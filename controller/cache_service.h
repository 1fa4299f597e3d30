// The controller as the fleet's binary cache: operators upload NARs and
// query the cache (cache.* requests), agents fetch objects (fetch messages),
// and each machine may fetch only paths in the closures of its current,
// target and previous generations (toplevels as the operator published them;
// closures from the stored narinfos' references, which are signed and never
// change once a path is in the cache) (everything else is 404, the same answer
// as for a path the cache lacks, so a machine learns nothing about others).
//
// Operator methods (params → result):
//   cache.missing {paths: [{path, narHash, narSize, compression?}]}
//                 → {missing: [{path, offset, compression}]} (without a compression
//                   asked for: the staged upload that got furthest)
//   cache.upload  {path, narHash, narSize, offset, compression?} + the bytes
//                 (zstd, or the NAR itself for compression "none") as the
//                 payload of a binary frame (or `data`, base64)  → {offset}
//   cache.commit  {path, narHash, narSize, references, deriver?, sigs, compression?}
//                                                      → {path, fileSize}
// compression is "zstd" (the default when absent) or "none"; an upload is
// staged, resumed and committed under the compression it names.
//   cache.status  {}                                   → {paths, bytes, narBytes, staged…,
//                                                         maxBytes, gcPaths, gcBytes}
//   cache.gc      {}                                   → {paths, bytes}
//   cache.allowed {machine}                            → {paths: [hash]} (operators may query)
// Thread-safe.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>

#include "common/protocol.h"
#include "controller/nar_cache.h"
#include "controller/store.h"

namespace muster {

class CacheService {
 public:
  // grace_s: how long an unreferenced path or a stale upload survives GC.
  CacheService(Store& store, std::unique_ptr<NarCache> cache, std::int64_t grace_s);
  ~CacheService();

  // An agent's fetch, answered for machine; never throws.
  proto::Fetched Fetch(const std::string& machine, const proto::Fetch& f);
  // Whether Fetch waits for a database (then not on an I/O thread).
  bool RemoteStorage() const { return cache_->RemoteStorage(); }
  // Operator requests; throws std::invalid_argument on bad params (the Api
  // turns it into an error response), returns an error for refused uploads.
  // payload: the bytes of a binary frame (cache.upload).
  Result<nlohmann::json> Handle(const std::string& method, const nlohmann::json& params,
                                std::string_view payload = {});

  // Store hashes machine may fetch (shared, not copied: asked once per chunk).
  std::shared_ptr<const std::set<std::string>> Allowed(const std::string& machine);
  // Removes what no machine needs (and stale uploads); returns {paths, bytes}.
  std::pair<std::uint64_t, std::uint64_t> CollectGarbage(bool dry_run);
  // Runs CollectGarbage every interval_s on a thread of its own until destruction.
  void StartSchedule(std::int64_t interval_s);

  // A signed preview of toplevel for machine: its closure may be fetched by
  // that machine for the next hour (one preview per machine; in memory).
  void AllowPreview(const std::string& machine, const std::string& toplevel);

  NarCache& cache() { return *cache_; }

 private:
  std::vector<std::string> Roots(const std::string& machine);

  Store& store_;
  std::unique_ptr<NarCache> cache_;
  std::int64_t grace_s_;
  std::mutex mu_;
  std::map<std::string, std::pair<std::string, std::shared_ptr<const std::set<std::string>>>>
      allowed_;  // machine → (roots, set)
  std::map<std::string, std::weak_ptr<const std::set<std::string>>> by_roots_;  // roots → set
  std::map<std::string, std::pair<std::string, std::int64_t>> previews_;  // machine → (top, until)
  std::mutex gc_mu_;
  std::condition_variable gc_cv_;
  bool stop_ = false;
  std::thread gc_thread_;
};

}  // namespace muster
