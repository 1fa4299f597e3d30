// The declarative roster: a file of operator-signed entries ('muster roster
// sign' writes it; the clan service renders it from the clan's public values)
// that the controller applies at start and again whenever the file changes.
//
// The file adds nothing the operators did not sign: every entry goes through
// Fleet's own checks (signature by a registered operator key, newer than what
// is held), so a machine in it needs no 'machine add' and a file edited by
// anyone else is refused entry by entry. An entry whose key differs from the
// registered one replaces the machine's key (its connection is closed); a
// signed removal removes the machine; a signed revocation revokes its key. Entries not newer than
// what the store holds are left alone. Not thread-safe: one watcher, called from one timer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "controller/fleet.h"

namespace muster {

struct RosterApplied {
  int added = 0, updated = 0, rekeyed = 0, removed = 0, revoked = 0, unchanged = 0;
  std::vector<std::string> refused;  // one message per refused entry: machine and why
  std::string Summary() const;
};

// Applies each entry of the file's text in order; a bad file (not the
// format) is an error and nothing is applied.
Result<RosterApplied> ApplyRosterText(Fleet& fleet, std::string_view text);

// Watches one roster file: Poll() applies it when it changed since the last
// poll (path, inode, size or modification time; a symlink is followed, so a
// NixOS /etc link to a new store path counts), and again while entries were
// refused and the set of operators may have changed since.
class RosterFile {
 public:
  RosterFile(Fleet& fleet, std::string path) : fleet_(fleet), path_(std::move(path)) {}
  // Applies the file now. At start-up a missing or malformed file is an
  // error; later the controller keeps what it applied and logs.
  Result<RosterApplied> Load();
  // Returns a result when it applied the file (or failed to), nullopt when
  // nothing changed.
  std::optional<Result<RosterApplied>> Poll();
  const std::string& path() const { return path_; }

 private:
  struct Stamp {
    std::uint64_t dev = 0, ino = 0;
    std::int64_t size = -1, mtime_ns = 0;
    bool operator==(const Stamp&) const = default;
  };
  std::optional<Stamp> StatFile() const;

  Fleet& fleet_;
  std::string path_;
  std::optional<Stamp> seen_;
  bool had_refusals_ = false;
  int polls_since_ = 0;
};

}  // namespace muster
