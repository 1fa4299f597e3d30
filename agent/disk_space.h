// Free-space checks before a deploy fills a disk.
//
// Before realising, the agent asks nix what it would fetch (`nix-store
// --realise --dry-run` with the manifest's substituters and keys: the same
// answer nix will act on, for the controller's cache and external caches
// alike, counting only what is missing from this store) and compares the
// unpacked size with the free space of the store's file system less a
// reserve. For a NixOS generation that installs boot entries it compares the
// kernel and initrd that are new to this machine with the free space in /boot.
// Pure functions except FreeBytes; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"
#include "common/fsutil.h"  // HumanSize

namespace muster {

// What `nix-store --realise --dry-run` says will be fetched.
struct FetchEstimate {
  bool known = false;  // a "will be fetched" line was found
  std::int64_t paths = 0;
  std::int64_t download_bytes = 0;
  std::int64_t unpacked_bytes = 0;
};

// Parses nix's dry-run report ("these 3 paths will be fetched (1.25 MiB
// download, 4.00 MiB unpacked):" or "this path will be fetched (…)"; sizes in
// B, KiB, MiB, GiB or TiB). Nothing to fetch, or no such line: known is false
// and the sizes are 0.
FetchEstimate ParseDryRunFetch(std::string_view text);

// Bytes available to an unprivileged writer on the file system holding path
// (statvfs f_bavail × f_frsize); an error naming the path when it cannot be
// read.
Result<std::int64_t> FreeBytes(const std::string& path);

// Ok when free_bytes - need_bytes >= reserve_bytes; otherwise an error that
// says what (what, e.g. "generation 7 of web1"), where (dir), how much is
// needed, free and reserved, and what to do.
Status CheckRoom(const std::string& what, const std::string& dir, std::int64_t free_bytes,
                 std::int64_t need_bytes, std::int64_t reserve_bytes, const std::string& advice);

}  // namespace muster
