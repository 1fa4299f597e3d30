// Every message that crosses a muster websocket, and its JSON mapping.
//
// Envelope: {"v":1,"type":"<type>","body":{…}}. Decode() checks size and nesting
// before building a DOM, checks the version and the schema of the body, and
// never throws. Unknown body fields are ignored (forward compatibility); unknown
// types and versions are errors. Golden files for every type live in tests/data.
//
// Agent ↔ controller (/v1/agent):
//   agent → hello, status, log            controller → welcome, deploy, ack, error
// Enrolment (/v1/enroll, unregistered key with a one-time token):
//   agent → enroll                         controller → enrolled, error
//   agent → fetch                          controller → fetched   (binary cache)
//   agent → preview-report                 controller → preview   (preview before go)
// Operator ↔ controller (/v1/operator):
//   CLI → request                          controller → response, event, error
//
// Bulk bytes (a `fetched` chunk, a `cache.upload` request) travel in binary
// websocket frames instead of base64 inside JSON: EncodeBinary() writes
//   [4 bytes: header length, big-endian][header: the JSON envelope][payload]
// with the payload left out of the header, and Decode() recognises such a
// frame by its first byte (0: no JSON text starts with it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/error.h"
#include "common/json_limits.h"
#include "common/manifest.h"

namespace muster::proto {

constexpr int kVersion = 1;

struct HostFacts {
  std::string system;      // e.g. x86_64-linux
  std::string os;          // nixos | darwin | linux
  std::string os_version;  // nixos-version / darwin-version output when present
  std::string hostname;
  std::string kernel;
};

// First message from an agent after the TLS handshake.
struct Hello {
  std::string machine;
  std::string agent_version;
  HostFacts facts;
  std::int64_t generation = 0;    // generation the agent is on or working on (0: none)
  std::string phase;              // its phase
  std::string toplevel;           // currently active toplevel when known
  std::int64_t last_applied = 0;  // highest generation accepted
};

// Progress of one generation on an agent. seq is answered by an ack.
struct StatusReport {
  std::uint64_t seq = 0;
  std::int64_t generation = 0;
  std::string phase;
  std::string detail;
  std::string toplevel;
  bool reboot_required = false;
  std::int64_t closure_bytes = 0;
  std::int64_t at = 0;             // unix ms on the agent
  std::optional<HostFacts> facts;  // sent with final reports: the OS may have changed
};

// Lines of output from realise or activation.
struct LogLines {
  std::int64_t generation = 0;
  std::string stream;  // realise | activate | rollback | health | agent
  std::vector<std::string> lines;
};

// First message on /v1/enroll: a machine registers its own key (the TLS
// client key) with a one-time token from 'muster machine enroll'. The token
// itself never leaves the machine: proof is the machine's key signed by the
// enrolment key derived from the token (common/roster.h), which the
// operator-signed grant names.
struct Enroll {
  std::string machine;
  std::string proof;  // base64 Ed25519 signature
};

// The controller's answer to a successful enroll; the connection then closes
// and the agent reconnects on /v1/agent.
struct Enrolled {
  std::string machine;
};

struct Welcome {
  std::string machine;
  std::int64_t server_time = 0;  // unix ms
};

struct Deploy {
  SignedManifest manifest;
  std::string vars;  // base64 of the sealed box, "" when none
};

struct Ack {
  std::uint64_t seq = 0;
};

struct ErrorMsg {
  std::string code;  // machine-readable, e.g. "bad-message", "not-registered"
  std::string message;
};

struct Request {
  std::uint64_t id = 0;
  std::string method;
  nlohmann::json params = nlohmann::json::object();
  std::string payload;  // raw bytes after the header of a binary frame (cache.upload)
};

struct Response {
  std::uint64_t id = 0;
  bool ok = true;
  nlohmann::json result = nlohmann::json::object();
  std::string error;
};

struct Event {
  std::string topic;
  nlohmann::json data = nlohmann::json::object();
};

// The agent's loopback substituter asks for part of an object in the
// controller's binary cache (agent/substituter.h): name is "nix-cache-info",
// "<hash>.narinfo" or "nar/…"; at most `length` bytes from offset.
struct Fetch {
  std::uint64_t id = 0;
  std::string name;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

// The answer: status 200 with the bytes (base64 in `data`) and the object's
// total size, or 404 (not in the cache, or not in a closure published for
// this machine) / 500 with a reason.
struct Fetched {
  std::uint64_t id = 0;
  int status = 200;
  std::uint64_t offset = 0;
  std::uint64_t total = 0;
  std::string data;  // raw bytes (base64 on the wire)
  std::string error;
};

// An operator's signed preview request (common/preview.h), forwarded to the
// agent: realise (download only) and dry-activate, then answer with a
// preview-report carrying the same id.
struct Preview {
  std::string id;
  SignedManifest manifest;  // signed under the preview domain
};

struct VersionChange {
  std::string name;
  std::string before;  // "" : added
  std::string after;   // "" : removed
};

// What a generation would change on a machine. error non-empty: the preview
// failed (nothing else is meaningful). Lists are bounded by the agent
// (kMaxPreviewItems each); the counts are the full numbers.
struct PreviewReport {
  std::string id;
  std::string error;
  std::string toplevel;  // previewed
  std::string current;   // active now ("" : none)
  std::int64_t fetch_paths = 0;
  std::int64_t download_bytes = 0;
  std::int64_t unpacked_bytes = 0;
  std::int64_t added_count = 0;
  std::int64_t removed_count = 0;
  std::vector<std::string> added;  // store path names without /nix/store/<hash>-
  std::vector<std::string> removed;
  std::vector<VersionChange> versions;
  std::vector<std::string> units_stop, units_reload, units_restart, units_start;
  bool reboot_required = false;
  std::int64_t at = 0;  // unix ms on the agent
};
constexpr std::size_t kMaxPreviewItems = 500;

using Message =
    std::variant<Hello, StatusReport, LogLines, Welcome, Deploy, Ack, ErrorMsg, Request, Response,
                 Event, Enroll, Enrolled, Fetch, Fetched, Preview, PreviewReport>;

std::string_view TypeName(const Message& m);
std::string Encode(const Message& m);
// A binary frame (see the top of this file) for a Fetched (payload: data) or
// a Request (payload: payload); other messages carry no payload and are
// encoded with an empty one.
std::string EncodeBinary(Message m);  // pass an rvalue to move the payload in
// The same frame in its two parts, for a gathered write: the length-prefixed
// header, then the payload as it was moved out of the message, never copied.
struct BinaryFrame {
  std::string head;
  std::string payload;
  std::size_t size() const { return head.size() + payload.size(); }
};
BinaryFrame EncodeBinaryParts(Message m);
// Largest header a binary frame may carry (the payload is bounded by the
// websocket's message limit).
constexpr std::size_t kMaxBinaryHeaderBytes = 64 * 1024;
// Largest `length` a fetch may ask for (the controller answers at most this),
// and so the largest fetched frame an agent must accept whatever its message limit.
constexpr std::size_t kMaxFetchChunk = 1 << 20;
constexpr std::size_t kMaxFetchedFrameBytes = 4 + kMaxBinaryHeaderBytes + kMaxFetchChunk;
// Fetches an agent has on their way at once, over all its requests: the
// controller queues every answer for that one connection.
constexpr std::size_t kMaxFetchesInFlight = 8;
// What the controller queues for one connection before it cuts the peer as
// not reading: the fetch answers an agent may have asked for at once, and
// room for everything else.
constexpr std::size_t kDefaultMaxOutboxBytes = 16 << 20;
static_assert(kDefaultMaxOutboxBytes >= kMaxFetchesInFlight * kMaxFetchedFrameBytes + (4 << 20));

struct DecodeLimits {
  std::size_t max_bytes = kDefaultMaxMessageBytes;
  int max_depth = kDefaultMaxJsonDepth;
};
// A text message, or a binary frame from EncodeBinary (limits apply to its header).
Result<Message> Decode(std::string_view text, const DecodeLimits& limits = {});

nlohmann::json ToJson(const HostFacts& f);
nlohmann::json ToJson(const PreviewReport& r);         // the body of a preview-report
HostFacts HostFactsFromJson(const nlohmann::json& j);  // lenient: missing fields are empty

}  // namespace muster::proto
