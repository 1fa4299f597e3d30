// Closures into the controller's binary cache (muster publish) and the
// cache commands (muster cache status|gc). See controller/cache_service.h for
// the requests and docs/CACHE.md for the layout.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/narinfo.h"
#include "controller/cli/connection.h"

namespace muster::cli {

// The reserved substituter name a manifest uses for the controller's cache.
constexpr const char* kControllerSubstituter = "muster:";

struct UploadOptions {
  std::size_t chunk_bytes = 2 << 20;  // compressed bytes per cache.upload (≤ 4 MiB)
  std::size_t window = 4;             // cache.upload requests in flight (and as many compressed
                                      // ahead): memory ≈ 2 × window × chunk_bytes
  int zstd_level = 3;
  // "auto": zstd unless the NAR's first MiB shrinks by less than 3 % at zstd
  // level 1 (random or already compressed data), then sent as it is
  // (Compression: none); "zstd" or "none" force one.
  std::string compression = "auto";
  bool progress = false;  // a progress line on stderr
  int max_attempts = 5;   // per path, across reconnects
};

// Uploads what the controller lacks of the closures of toplevels, each path's
// narinfo signed with key. reconnect replaces a broken connection (returns
// null when it cannot). Fails naming the path and the reason.
Status UploadClosures(std::unique_ptr<Connection>& conn,
                      const std::function<std::unique_ptr<Connection>()>& reconnect,
                      const std::vector<std::string>& toplevels, const nar::SigningKey& key,
                      const UploadOptions& o);

// Loads the operator's Nix cache signing key: file, or the managed
// ~/.config/muster/cache.key when file is "". The error says how to create one.
Result<nar::SigningKey> LoadCacheKey(const std::string& file);
std::string DefaultCacheKeyPath();

}  // namespace muster::cli
