// The agent's replay floor: the highest generation number and the newest
// signing time (createdAt) it ever accepted.
//
// Kept twice: in state.json with the deploy record, and in <stateDir>/floor.json
// (0600, replaced atomically and fsynced before state.json records an
// acceptance) beside the machine key. floor.json is written when the key is
// created and is never lowered, so moving state.json aside (the remedy for a
// corrupt state) does not let a controller replay older generations. The agent
// starts from the larger of the two; when neither file exists (an install from
// before floor.json, or both moved aside) it starts from the key file's
// modification time as the signing-time floor. Thread-compatible: plain
// functions over files.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "agent/state.h"
#include "common/crypto.h"
#include "common/error.h"

namespace muster {

struct Floor {
  std::int64_t last_applied = 0;     // highest generation accepted
  std::int64_t last_created_at = 0;  // newest createdAt accepted (unix seconds)

  bool operator==(const Floor&) const = default;
};

// Field by field maximum: a floor only ever rises.
Floor MaxFloor(const Floor& a, const Floor& b);

// {"format":1,"lastApplied":N,"lastCreatedAt":T}
std::string EncodeFloor(const Floor& f);
Result<Floor> DecodeFloor(std::string_view text);

// nullopt when the file does not exist; an error naming the file and what to
// do when it cannot be read or is corrupt.
Result<std::optional<Floor>> LoadFloor(const std::string& path);
// Replaces the file atomically (0600; file and directory fsynced).
Status SaveFloor(const Floor& f, const std::string& path);

// Loads the machine key; on first use creates it and, unless one exists,
// floor.json with now_s as its signing-time floor (no manifest for this key
// can have been signed before the key existed).
Result<SecretKey> LoadOrCreateMachineKey(const std::string& key_path, const std::string& floor_path,
                                         std::int64_t now_s);

// A key provided by a secret store (machineKeyFile, e.g. clan vars): loaded,
// never created. Fails naming the file and what to do when it is missing,
// readable by others or malformed.
Result<SecretKey> LoadProvidedMachineKey(const std::string& key_path);

// When the machine key came to be: the signing-time floor when neither
// floor.json nor state.json exists. A key the agent created: its file's
// modification time (written once, never rewritten). A provided key: a secret
// store may install it afresh at every activation (sops-nix decrypts into
// /run/secrets.d/<n>), so its modification time can be later than manifests
// legitimately signed for it, and a machine that first starts after a publish
// would refuse it; the configured creation time (machineKeyCreatedAt, written
// by the generator that made the key) is used instead, or 0 when unknown.
struct KeyTime {
  std::optional<std::int64_t> seconds;
  std::string what;  // for the log: where the time came from
};
KeyTime MachineKeyTime(const std::string& key_path, bool provided, std::int64_t created_at_s);

// What the state says: lastApplied, and the newest of lastCreatedAt and the
// createdAt of the records it holds (state.json written before lastCreatedAt
// existed still carries the manifest of the last deploy).
Floor FloorOfState(const AgentState& s);

struct StartFloor {
  Floor floor;
  std::string note;            // where the floor came from, for the log
  bool from_key_time = false;  // neither floor.json nor state.json existed
};

// Pure: the floor the agent starts from. file: floor.json (nullopt: missing);
// state: FloorOfState of state.json (nullopt: missing); key_mtime_s: the
// machine key file's modification time, used only when both are missing.
StartFloor ResolveStartFloor(const std::optional<Floor>& file, const std::optional<Floor>& state,
                             std::optional<std::int64_t> key_mtime_s);
StartFloor ResolveStartFloor(const std::optional<Floor>& file, const std::optional<Floor>& state,
                             const KeyTime& key_time);

// At start-up: ResolveStartFloor over the files in place (file and state as
// already loaded), then writes floor.json when it is missing or behind. A
// failed write is returned as an error beside the floor; the agent runs on and
// accepts nothing until the floor can be written.
struct EstablishedFloor {
  StartFloor start;
  Status written;
};
EstablishedFloor EstablishFloor(const std::string& floor_path, const std::string& key_path,
                                const std::optional<Floor>& file,
                                const std::optional<AgentState>& state);
EstablishedFloor EstablishFloor(const std::string& floor_path, const KeyTime& key_time,
                                const std::optional<Floor>& file,
                                const std::optional<AgentState>& state);

// The advice printed when state.json cannot be read: what moving it aside
// keeps and loses, given what floor.json holds (nullopt: missing).
std::string UnreadableStateAdvice(const std::string& state_path, const std::string& floor_path,
                                  const std::optional<Floor>& file);

}  // namespace muster
