// File helpers that never leave a half-written file or directory behind.
//
// Every writer stages its output beside the target, fsyncs it, renames it into
// place and fsyncs the parent directory, so that after a crash the target is
// either the old or the new content. Thread-safe (no shared state).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "common/error.h"

namespace muster {

// Reads a whole file; fails if it is larger than max_bytes.
Result<std::string> ReadFile(const std::filesystem::path& path, std::size_t max_bytes = 16u << 20);

// Replaces path with content, created with the given mode.
Status WriteFileAtomic(const std::filesystem::path& path, std::string_view content,
                       mode_t mode = 0644);

// Creates path with content (written beside it, fsynced) only if nothing
// exists at path: the check and the creation are one step (renameat2
// RENAME_NOREPLACE, or link() where that is unsupported), so an existing file
// is never replaced, even by a concurrent writer. On failure sets *existed
// (when given) to whether something was already at path.
Status WriteFileExclusive(const std::filesystem::path& path, std::string_view content,
                          mode_t mode = 0600, bool* existed = nullptr);

// mkdir -p with the given mode for directories it creates.
Status MakeDirs(const std::filesystem::path& path, mode_t mode = 0755);

// fsyncs a file or directory by path.
Status FsyncPath(const std::filesystem::path& path);

// A byte count for people: "12.3 MiB", "512 B" and the like.
std::string HumanSize(std::int64_t bytes);

// Swaps a fully written and fsynced directory `staged` into `target`
// (renameat2 RENAME_EXCHANGE where the target exists, so readers never see it
// missing), fsyncs the parent and removes the old content. staged and target must
// be on the same file system (stage beside the target).
Status ReplaceDirectoryAtomic(const std::filesystem::path& staged,
                              const std::filesystem::path& target);

// Like ReplaceDirectoryAtomic, but the old content of target is moved to
// keep_old_at (same file system) instead of being deleted; an empty keep_old_at
// deletes it.
Status ReplaceDirectoryAtomicKeep(const std::filesystem::path& staged,
                                  const std::filesystem::path& target,
                                  const std::filesystem::path& keep_old_at);

// A fresh, unique path beside `target` (same directory) for staging.
std::filesystem::path StagingPathFor(const std::filesystem::path& target, std::string_view tag);

// Reads the target of a symlink; fails if path is not a symlink.
Result<std::string> ReadLink(const std::filesystem::path& path);

}  // namespace muster
