#include "controller/roster_file.h"

#include <sys/stat.h>

#include "common/fsutil.h"
#include "common/roster.h"

namespace muster {

namespace {

constexpr std::size_t kMaxRosterFileBytes = 64u << 20;
// While entries are refused (an operator not registered yet, say), the file is
// applied again this often (polls are a second apart).
constexpr int kRetryPolls = 10;

std::int64_t HeldSignedAt(const MachineRecord& m) {
  if (m.roster.empty()) return 0;
  auto s = DecodeSignedRosterEntry(m.roster);
  if (!s) return 0;
  auto e = ParseRosterEntry(s->entry);
  return e ? e->signed_at : 0;
}

}  // namespace

std::string RosterApplied::Summary() const {
  return std::to_string(added) + " added, " + std::to_string(updated) + " updated, " +
         std::to_string(rekeyed) + " with a new key, " + std::to_string(removed) + " removed, " +
         std::to_string(revoked) + " revoked, " + std::to_string(unchanged) + " unchanged, " +
         std::to_string(refused.size()) + " refused";
}

Result<RosterApplied> ApplyRosterText(Fleet& fleet, std::string_view text) {
  auto entries = DecodeRosterFile(text);
  if (!entries) return entries.error();
  RosterApplied out;
  for (const auto& s : *entries) {
    auto e = CheckRosterSignature(s);
    if (!e) {
      out.refused.push_back(e.message());
      continue;
    }
    auto refuse = [&](const Status& st) {
      out.refused.push_back("'" + e->machine + "': " + st.message());
    };
    if (!e->enroll_key.empty()) {
      refuse(Err("enrolment grants do not belong in a roster file; use 'muster machine enroll'"));
      continue;
    }
    auto held = fleet.store().GetMachine(e->machine);
    if (held && e->signed_at <= HeldSignedAt(*held)) {
      ++out.unchanged;
      continue;
    }
    if (e->revoked) {
      if (!held) {
        refuse(Err("a revocation for a machine this controller does not hold"));
      } else if (auto st = fleet.RevokeMachine(s); !st) {
        refuse(st);
      } else {
        ++out.revoked;
      }
      continue;
    }
    if (e->removed) {
      if (!held) {
        ++out.unchanged;
        continue;
      }
      if (auto st = fleet.RemoveMachine(s); !st) {
        refuse(st);
      } else {
        ++out.removed;
      }
      continue;
    }
    if (!held) {
      if (auto st = fleet.AddMachine(s); !st) {
        refuse(st);
      } else {
        ++out.added;
      }
      continue;
    }
    if (held->key == e->key) {
      if (auto st = fleet.UpdateMachine(s); !st) {
        refuse(st);
      } else {
        ++out.updated;
      }
      continue;
    }
    // A new key (regenerated vars): only an entry a registered operator
    // signed may replace it, so check before the old key goes.
    auto probe = fleet.ValidateRosterEntry(s);
    if (!probe) {
      refuse(probe.error());
      continue;
    }
    if (auto st = fleet.RemoveMachine(e->machine); !st) {
      refuse(st);
      continue;
    }
    if (auto st = fleet.AddMachine(s); !st) {
      refuse(st);
    } else {
      ++out.rekeyed;
    }
  }
  return out;
}

std::optional<RosterFile::Stamp> RosterFile::StatFile() const {
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) return std::nullopt;
  Stamp s;
  s.dev = static_cast<std::uint64_t>(st.st_dev);
  s.ino = static_cast<std::uint64_t>(st.st_ino);
  s.size = static_cast<std::int64_t>(st.st_size);
  s.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return s;
}

Result<RosterApplied> RosterFile::Load() {
  seen_ = StatFile();
  polls_since_ = 0;
  auto text = ReadFile(path_, kMaxRosterFileBytes);
  if (!text) {
    had_refusals_ = false;
    return Err("roster file " + path_ + ": " + text.message());
  }
  auto applied = ApplyRosterText(fleet_, *text);
  if (!applied) {
    had_refusals_ = false;
    return Err(path_ + ": " + applied.message() + " (write it with 'muster roster sign')");
  }
  had_refusals_ = !applied->refused.empty();
  return applied;
}

std::optional<Result<RosterApplied>> RosterFile::Poll() {
  auto now = StatFile();
  ++polls_since_;
  bool changed = now != seen_;
  if (!changed && !(had_refusals_ && polls_since_ >= kRetryPolls)) return std::nullopt;
  if (!now) {  // gone: keep what was applied; say so once
    seen_ = now;
    return Result<RosterApplied>(
        Err("roster file " + path_ + " is gone; the machines it registered stay registered"));
  }
  return Load();
}

}  // namespace muster
