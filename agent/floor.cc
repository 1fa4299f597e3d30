#include "agent/floor.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/fsutil.h"
#include "common/json_limits.h"

namespace muster {

using nlohmann::json;

namespace {
constexpr std::size_t kMaxFloorBytes = 4096;
// What an operator writes to start a floor afresh: nothing signed before now.
constexpr const char* kFreshFloor =
    R"({"format":1,"lastApplied":0,"lastCreatedAt":NOW} (NOW from `date +%s`; mode 0600))";

std::string Describe(const Floor& f) {
  if (f.last_applied == 0) {
    return "no generation accepted, signing-time floor " + UnixSecondsText(f.last_created_at);
  }
  return "generation " + std::to_string(f.last_applied) + ", signed at " +
         UnixSecondsText(f.last_created_at);
}

std::optional<std::int64_t> MtimeSeconds(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return static_cast<std::int64_t>(st.st_mtim.tv_sec);
}

bool Exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}
}  // namespace

Floor MaxFloor(const Floor& a, const Floor& b) {
  return {std::max(a.last_applied, b.last_applied), std::max(a.last_created_at, b.last_created_at)};
}

std::string EncodeFloor(const Floor& f) {
  json j = {{"format", 1}, {"lastApplied", f.last_applied}, {"lastCreatedAt", f.last_created_at}};
  return j.dump() + "\n";
}

Result<Floor> DecodeFloor(std::string_view text) {
  auto parsed = ParseJsonBounded(text, kMaxFloorBytes, 2);
  if (!parsed) return Err(parsed.message());
  const json& j = *parsed;
  auto int_field = [&](const char* key) -> std::optional<std::int64_t> {
    if (!j.is_object() || !j.contains(key)) return std::nullopt;
    const json& v = j.at(key);
    if (!v.is_number_integer() ||
        (v.is_number_unsigned() &&
         v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))) {
      return std::nullopt;
    }
    return v.get<std::int64_t>();
  };
  auto format = int_field("format");
  if (!format || *format != 1) return Err("not a floor file of format 1");
  auto applied = int_field("lastApplied");
  auto created = int_field("lastCreatedAt");
  if (!applied || *applied < 0 || !created) {
    return Err(
        "'lastApplied' (a generation, >= 0) and 'lastCreatedAt' (unix seconds) must be "
        "integers");
  }
  return Floor{*applied, *created};
}

Result<std::optional<Floor>> LoadFloor(const std::string& path) {
  if (!Exists(path)) return std::optional<Floor>();
  auto text = ReadFile(path, kMaxFloorBytes);
  Result<Floor> f = text ? DecodeFloor(*text) : Result<Floor>(text.error());
  if (!f) {
    return Err(path + ": " + f.message() +
               "; this file holds the newest generation this machine accepted, so that no older "
               "one is accepted again. While state.json is intact, move it aside: it is then "
               "rebuilt from state.json. Otherwise write it as " +
               kFreshFloor +
               ", which refuses every manifest signed before now (publish again afterwards)");
  }
  return std::optional<Floor>(*f);
}

Status SaveFloor(const Floor& f, const std::string& path) {
  if (auto st = WriteFileAtomic(path, EncodeFloor(f), 0600); !st) {
    return Err("cannot write the replay floor: " + st.message());
  }
  return Status::Ok();
}

Result<SecretKey> LoadOrCreateMachineKey(const std::string& key_path, const std::string& floor_path,
                                         std::int64_t now_s) {
  const bool created = !Exists(key_path);
  auto key = LoadOrCreateSecretKey(key_path);
  if (!key || !created || Exists(floor_path)) return key;
  // A crash before this write leaves a key without a floor: the next start
  // falls back to the key's modification time, which is the same instant.
  if (auto st = SaveFloor(Floor{0, now_s}, floor_path); !st) return st.error();
  return key;
}

Result<SecretKey> LoadProvidedMachineKey(const std::string& key_path) {
  if (!Exists(key_path)) {
    return Err("machineKeyFile " + key_path +
               " does not exist; the secret store installs it (with clan: deploy the machine once "
               "with 'clan machines update', or check the muster-agent vars generator), or remove "
               "machineKeyFile to let the agent create its own key");
  }
  auto key = LoadSecretKey(key_path);
  if (!key) return Err("machineKeyFile: " + key.message());
  return key;
}

KeyTime MachineKeyTime(const std::string& key_path, bool provided, std::int64_t created_at_s) {
  if (!provided) return {MtimeSeconds(key_path), "the machine key's modification time"};
  if (created_at_s > 0)
    return {created_at_s, "the provided key's creation time (machineKeyCreatedAt)"};
  return {0,
          "no time (machineKeyFile is given without machineKeyCreatedAt, and a provided key's "
          "modification time says nothing about when it was made)"};
}

Floor FloorOfState(const AgentState& s) {
  Floor f{s.last_applied, s.last_created_at};
  for (const auto* r : {&s.current, &s.pending}) {
    if (*r) f.last_created_at = std::max(f.last_created_at, (*r)->manifest.created_at);
  }
  return f;
}

StartFloor ResolveStartFloor(const std::optional<Floor>& file, const std::optional<Floor>& state,
                             std::optional<std::int64_t> key_mtime_s) {
  return ResolveStartFloor(file, state,
                           KeyTime{key_mtime_s, "the machine key's modification time"});
}

StartFloor ResolveStartFloor(const std::optional<Floor>& file, const std::optional<Floor>& state,
                             const KeyTime& key_time) {
  StartFloor out;
  if (file && state) {
    out.floor = MaxFloor(*file, *state);
    out.note = "replay floor: " + Describe(out.floor) + " (floor.json and state.json)";
  } else if (file) {
    out.floor = *file;
    out.note = "replay floor: " + Describe(out.floor) +
               " (floor.json; state.json is absent, so no deploy record was resumed)";
  } else if (state) {
    out.floor = *state;
    out.note = "replay floor: " + Describe(out.floor) +
               " (state.json; floor.json was missing and is written now)";
  } else {
    out.from_key_time = true;
    out.floor = Floor{0, key_time.seconds.value_or(0)};
    out.note =
        "neither state.json nor floor.json exists (a first start, an install from before "
        "floor.json, or both moved aside): starting from " +
        key_time.what + " " + UnixSecondsText(out.floor.last_created_at) +
        " as the signing-time floor; manifests signed before it are refused, and "
        "floor.json is written now";
  }
  return out;
}

EstablishedFloor EstablishFloor(const std::string& floor_path, const std::string& key_path,
                                const std::optional<Floor>& file,
                                const std::optional<AgentState>& state) {
  return EstablishFloor(floor_path, MachineKeyTime(key_path, false, 0), file, state);
}

EstablishedFloor EstablishFloor(const std::string& floor_path, const KeyTime& key_time,
                                const std::optional<Floor>& file,
                                const std::optional<AgentState>& state) {
  EstablishedFloor out;
  std::optional<Floor> from_state;
  if (state) from_state = FloorOfState(*state);
  out.start = ResolveStartFloor(file, from_state, key_time);
  if (!file || *file != out.start.floor) out.written = SaveFloor(out.start.floor, floor_path);
  return out;
}

std::string UnreadableStateAdvice(const std::string& state_path, const std::string& floor_path,
                                  const std::optional<Floor>& file) {
  if (file) {
    return "refusing to start with an unreadable state. Moving " + state_path +
           " aside is safe: the replay floor in " + floor_path + " (" + Describe(*file) +
           ") is kept, so no older generation is accepted again. What is lost is the record of "
           "the last deploy: an interrupted one is not resumed (check the machine and publish "
           "again if needed). Keep " +
           floor_path + " and the machine key";
  }
  return "refusing to start with an unreadable state. Do not simply move " + state_path +
         " aside: there is no " + floor_path +
         " yet, so the agent would fall back to the machine key's modification time as its "
         "floor and could accept generations signed since then again. Repair " +
         state_path + " (JSON), or first write " + floor_path + " as " + kFreshFloor +
         ", which refuses every manifest signed before now, then move the state aside and "
         "publish again";
}

}  // namespace muster
