#include "controller/cache_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace muster {

using nlohmann::json;

namespace {

std::string NeedStr(const json& p, const char* k) {
  auto it = p.find(k);
  if (it == p.end() || !it->is_string() || it->get<std::string>().empty()) {
    throw std::invalid_argument(std::string("parameter '") + k + "' (a string) is required");
  }
  return it->get<std::string>();
}
std::uint64_t NeedU64(const json& p, const char* k) {
  auto it = p.find(k);
  if (it == p.end() || !it->is_number_unsigned()) {
    throw std::invalid_argument(std::string("parameter '") + k +
                                "' (a non-negative integer) is required");
  }
  return it->get<std::uint64_t>();
}
std::vector<std::string> StrList(const json& p, const char* k) {
  std::vector<std::string> out;
  auto it = p.find(k);
  if (it == p.end()) return out;
  if (!it->is_array())
    throw std::invalid_argument(std::string("parameter '") + k + "' must be a list");
  for (const auto& v : *it) {
    if (!v.is_string())
      throw std::invalid_argument(std::string("parameter '") + k + "' must list strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

// The optional "compression" of an upload request; zstd when absent.
NarCompression CompressionOf(const json& p) {
  auto it = p.find("compression");
  if (it == p.end()) return NarCompression::kZstd;
  if (!it->is_string()) throw std::invalid_argument("parameter 'compression' must be a string");
  auto c = ParseNarCompression(it->get<std::string>());
  if (!c) throw std::invalid_argument(c.message());
  return *c;
}

std::int64_t NowS() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

CacheService::CacheService(Store& store, std::unique_ptr<NarCache> cache, std::int64_t grace_s)
    : store_(store), cache_(std::move(cache)), grace_s_(grace_s) {}

CacheService::~CacheService() {
  {
    std::lock_guard lock(gc_mu_);
    stop_ = true;
  }
  gc_cv_.notify_all();
  if (gc_thread_.joinable()) gc_thread_.join();
}

std::vector<std::string> CacheService::Roots(const std::string& machine) {
  std::vector<std::string> roots;
  // Current: the toplevel of the generation the machine reports being on, as
  // the operator published it (never the toplevel the machine itself names:
  // a machine could name another's and read its closure).
  if (auto m = store_.GetMachine(machine); m && m->generation > 0) {
    if (auto g = store_.GetGeneration(machine, m->generation)) roots.push_back(g->toplevel);
  }
  // Target and previous: the two newest generations (released or held by a rollout).
  for (const auto& g : store_.ListGenerations(machine, 2)) roots.push_back(g.toplevel);
  // A recent preview an operator signed for it.
  {
    std::lock_guard lock(mu_);
    auto it = previews_.find(machine);
    if (it != previews_.end()) {
      if (it->second.second > NowS()) {
        roots.push_back(it->second.first);
      } else {
        previews_.erase(it);
      }
    }
  }
  std::sort(roots.begin(), roots.end());
  roots.erase(std::unique(roots.begin(), roots.end()), roots.end());
  return roots;
}

void CacheService::AllowPreview(const std::string& machine, const std::string& toplevel) {
  std::lock_guard lock(mu_);
  if (previews_.size() > 100000) previews_.clear();
  previews_[machine] = {toplevel, NowS() + 3600};
}

std::shared_ptr<const std::set<std::string>> CacheService::Allowed(const std::string& machine) {
  auto roots = Roots(machine);
  // The cache's revision is part of the key: a set is recomputed once the
  // index changed (a commit, or a path another controller committed).
  std::string roots_key;
  for (const auto& r : roots) roots_key += "\n" + r;
  auto key_at = [&](std::uint64_t revision) { return std::to_string(revision) + roots_key; };
  std::string key = key_at(cache_->Revision());
  {
    std::lock_guard lock(mu_);
    auto it = allowed_.find(machine);
    if (it != allowed_.end() && it->second.first == key) return it->second.second;
    // Machines on the same generations share one set.
    if (auto s = by_roots_[key].lock()) {
      allowed_[machine] = {key, s};
      return s;
    }
  }
  auto set = std::make_shared<const std::set<std::string>>(cache_->Closure(roots));
  // The walk may itself have found paths: key the set by the revision after it.
  key = key_at(cache_->Revision());
  std::lock_guard lock(mu_);
  if (allowed_.size() > 100000) allowed_.clear();
  if (by_roots_.size() > 100000) by_roots_.clear();
  allowed_[machine] = {key, set};
  by_roots_[key] = set;
  return set;
}

proto::Fetched CacheService::Fetch(const std::string& machine, const proto::Fetch& f) {
  proto::Fetched r;
  r.id = f.id;
  r.offset = f.offset;
  try {
    std::string h = NarCache::HashOfObject(f.name);
    if (f.name != "nix-cache-info") {
      // Paths outside this machine's closures look exactly like absent ones.
      // A path this controller has not seen may have been committed through
      // another one sharing the storage: Has finds it, which moves the
      // cache's revision, and the set is computed again.
      auto allowed = Allowed(machine);
      if (!h.empty() && !allowed->count(h) && cache_->Has(h)) allowed = Allowed(machine);
      if (h.empty() || !allowed->count(h)) {
        r.status = 404;
        r.error = "not in a closure published for " + machine;
        return r;
      }
    }
    std::uint64_t total = 0;
    std::size_t len =
        static_cast<std::size_t>(std::min<std::uint64_t>(f.length, proto::kMaxFetchChunk));
    auto data = cache_->Read(f.name, f.offset, len, &total);
    if (!data) {
      r.status = 404;
      r.error = data.message();
      return r;
    }
    r.total = total;
    r.data = std::move(*data);
  } catch (const std::exception& e) {
    r.status = 500;
    r.error = e.what();
  }
  return r;
}

Result<json> CacheService::Handle(const std::string& method, const json& p,
                                  std::string_view payload) {
  if (method == "cache.missing") {
    auto it = p.find("paths");
    if (it == p.end() || !it->is_array())
      throw std::invalid_argument("parameter 'paths' (a list) is required");
    if (it->size() > 1000000)
      throw std::invalid_argument("more than a million paths in one request");
    json missing = json::array();
    for (const auto& e : *it) {
      if (!e.is_object()) throw std::invalid_argument("each path is {path, narHash, narSize}");
      std::string path = NeedStr(e, "path");
      if (nar::StorePathHash(path).empty()) {
        return Err("'" + path.substr(0, 120) + "' is not a store path");
      }
      if (cache_->Has(path)) continue;
      // Without a compression named: whichever staged upload got further.
      std::string nar_hash = e.value("narHash", "");
      NarCompression c = CompressionOf(e);
      std::uint64_t offset = cache_->StagedOffset(path, nar_hash, c);
      if (!e.contains("compression")) {
        std::uint64_t raw = cache_->StagedOffset(path, nar_hash, NarCompression::kNone);
        if (raw > offset) {
          c = NarCompression::kNone;
          offset = raw;
        }
      }
      missing.push_back(
          {{"path", path}, {"offset", offset}, {"compression", NarCompressionName(c)}});
    }
    return json{{"missing", missing}};
  }
  if (method == "cache.upload") {
    std::string path = NeedStr(p, "path");
    std::string decoded;
    if (p.contains("data")) {
      if (!payload.empty())
        throw std::invalid_argument("upload bytes both in 'data' and as a binary payload");
      auto d = Base64Decode(p.value("data", ""));
      if (!d) throw std::invalid_argument("parameter 'data' must be base64");
      decoded = std::move(*d);
      payload = decoded;
    }
    auto off = cache_->Append(path, NeedStr(p, "narHash"), NeedU64(p, "narSize"),
                              NeedU64(p, "offset"), payload, CompressionOf(p));
    if (!off) return off.error();
    return json{{"offset", *off}};
  }
  if (method == "cache.commit") {
    nar::NarInfo info;
    info.store_path = NeedStr(p, "path");
    info.nar_hash = NeedStr(p, "narHash");
    info.nar_size = NeedU64(p, "narSize");
    info.compression = NarCompressionName(CompressionOf(p));
    for (const auto& r : StrList(p, "references")) {
      std::string b = r.rfind("/nix/store/", 0) == 0 ? r.substr(11) : r;
      if (nar::StorePathHash(b).empty())
        return Err("reference '" + r.substr(0, 120) + "' is not a store path");
      info.references.push_back(b);
    }
    std::sort(info.references.begin(), info.references.end());
    std::string deriver = p.value("deriver", "");
    if (!deriver.empty()) {
      info.deriver = deriver.rfind("/nix/store/", 0) == 0 ? deriver.substr(11) : deriver;
      if (nar::StorePathHash(info.deriver).empty()) return Err("deriver is not a store path");
    }
    info.sigs = StrList(p, "sigs");
    if (info.sigs.empty())
      return Err("the narinfo for " + info.store_path +
                 " carries no signature; sign it with a cache key");
    auto done = cache_->Commit(info);
    if (!done) return done.error();
    return json{{"path", done->store_path}, {"fileSize", done->file_size}};
  }
  if (method == "cache.status") {
    auto s = cache_->Stats();
    auto [gp, gb] = CollectGarbage(true);
    return json{{"paths", s.paths},
                {"bytes", s.bytes},
                {"narBytes", s.nar_bytes},
                {"stagedPaths", s.staged_paths},
                {"stagedBytes", s.staged_bytes},
                {"maxBytes", s.max_bytes},
                {"gcPaths", gp},
                {"gcBytes", gb}};
  }
  if (method == "cache.gc") {
    auto [gp, gb] = CollectGarbage(false);
    return json{{"paths", gp}, {"bytes", gb}};
  }
  if (method == "cache.allowed") {
    auto set = Allowed(NeedStr(p, "machine"));
    return json{{"paths", json(std::vector<std::string>(set->begin(), set->end()))}};
  }
  throw std::invalid_argument("unknown method '" + method + "'");
}

std::pair<std::uint64_t, std::uint64_t> CacheService::CollectGarbage(bool dry_run) {
  std::set<std::string> keep;
  const std::uint64_t failures = store_.Failures();
  for (const auto& m : store_.ListMachines()) {
    auto a = Allowed(m.name);
    keep.insert(a->begin(), a->end());
    // What a machine reports running stays too (GC only; it authorises nothing).
    if (!m.toplevel.empty()) {
      auto running = cache_->Closure({m.toplevel});
      keep.insert(running.begin(), running.end());
    }
  }
  // Reads that failed (a database down) would make every path look
  // unreferenced: collect nothing this time.
  if (store_.Failures() != failures) {
    spdlog::warn("cache: garbage collection skipped: the store did not answer");
    return {0, 0};
  }
  auto out = cache_->CollectGarbage(keep, grace_s_, dry_run);
  if (!dry_run && out.first) {
    spdlog::info("cache: garbage collection removed {} paths, {} bytes", out.first, out.second);
  }
  return out;
}

void CacheService::StartSchedule(std::int64_t interval_s) {
  gc_thread_ = std::thread([this, interval_s] {
    std::unique_lock lock(gc_mu_);
    while (!gc_cv_.wait_for(lock, std::chrono::seconds(interval_s), [&] { return stop_; })) {
      lock.unlock();
      try {
        CollectGarbage(false);
      } catch (const std::exception& e) {
        spdlog::error("cache: garbage collection failed: {}", e.what());
      }
      lock.lock();
    }
  });
}

}  // namespace muster
