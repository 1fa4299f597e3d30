#include "common/protocol.h"

#include <algorithm>

#include "common/crypto.h"
#include "common/utf8.h"

namespace muster::proto {

using nlohmann::json;

namespace {

template <class... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

// Typed field access; throws json::exception on a missing field or wrong type,
// caught in Decode.
std::string Str(const json& j, const char* k) { return j.at(k).get<std::string>(); }
std::string OptStr(const json& j, const char* k) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return {};
  return it->get<std::string>();
}
std::int64_t Int(const json& j, const char* k) {
  const json& v = j.at(k);
  if (!v.is_number_integer())
    throw json::type_error::create(302, std::string(k) + " must be an integer", &v);
  return v.get<std::int64_t>();
}
std::int64_t OptInt(const json& j, const char* k) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return 0;
  if (!it->is_number_integer())
    throw json::type_error::create(302, std::string(k) + " must be an integer", &*it);
  return it->get<std::int64_t>();
}
std::uint64_t UInt(const json& j, const char* k) {
  const json& v = j.at(k);
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0)) {
    throw json::type_error::create(302, std::string(k) + " must be a non-negative integer", &v);
  }
  return v.get<std::uint64_t>();
}
bool OptBool(const json& j, const char* k) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return false;
  return it->get<bool>();
}

json Body(const Hello& m) {
  return {{"machine", m.machine},
          {"agentVersion", m.agent_version},
          {"facts", ToJson(m.facts)},
          {"generation", m.generation},
          {"phase", m.phase},
          {"toplevel", m.toplevel},
          {"lastApplied", m.last_applied}};
}
json Body(const StatusReport& m) {
  json j = {{"seq", m.seq},
            {"generation", m.generation},
            {"phase", m.phase},
            {"detail", m.detail},
            {"toplevel", m.toplevel},
            {"rebootRequired", m.reboot_required},
            {"closureBytes", m.closure_bytes},
            {"at", m.at}};
  if (m.facts) j["facts"] = ToJson(*m.facts);
  return j;
}
json Body(const LogLines& m) {
  return {{"generation", m.generation}, {"stream", m.stream}, {"lines", m.lines}};
}
json Body(const Welcome& m) { return {{"machine", m.machine}, {"serverTime", m.server_time}}; }
json Body(const Deploy& m) {
  return {{"manifest", m.manifest.manifest},
          {"signer", m.manifest.signer},
          {"signature", m.manifest.signature},
          {"vars", m.vars}};
}
json Body(const Ack& m) { return {{"seq", m.seq}}; }
json Body(const ErrorMsg& m) { return {{"code", m.code}, {"message", m.message}}; }
json Body(const Request& m) { return {{"id", m.id}, {"method", m.method}, {"params", m.params}}; }
json Body(const Response& m) {
  json j = {{"id", m.id}, {"ok", m.ok}};
  if (m.ok) {
    j["result"] = m.result;
  } else {
    j["error"] = m.error;
  }
  return j;
}
json Body(const Event& m) { return {{"topic", m.topic}, {"data", m.data}}; }
json Body(const Enroll& m) { return {{"machine", m.machine}, {"proof", m.proof}}; }
json Body(const Enrolled& m) { return {{"machine", m.machine}}; }
json Body(const Fetch& m) {
  return {{"id", m.id}, {"name", m.name}, {"offset", m.offset}, {"length", m.length}};
}
json Body(const Fetched& m) {
  json j = {{"id", m.id},
            {"status", m.status},
            {"offset", m.offset},
            {"total", m.total},
            {"data", Base64Encode(m.data)}};
  if (!m.error.empty()) j["error"] = m.error;
  return j;
}

json Body(const Preview& m) {
  return {{"id", m.id},
          {"manifest", m.manifest.manifest},
          {"signer", m.manifest.signer},
          {"signature", m.manifest.signature}};
}
json Body(const PreviewReport& m) { return ToJson(m); }

std::vector<std::string> StrList(const json& b, const char* k) {
  auto it = b.find(k);
  if (it == b.end() || it->is_null()) return {};
  auto v = it->get<std::vector<std::string>>();
  if (v.size() > kMaxPreviewItems) throw std::invalid_argument(std::string(k) + " is too long");
  return v;
}

// b is the decoded document's body, taken apart: the JSON payloads of
// requests, responses and events are moved out, never copied (a roster or a
// rollout is megabytes).
Result<Message> DecodeBody(std::string_view type, json& b) {
  if (type == "hello") {
    Hello m;
    m.machine = Str(b, "machine");
    m.agent_version = Str(b, "agentVersion");
    if (b.contains("facts")) {
      if (!b.at("facts").is_object()) return Err("hello: facts must be an object");
      m.facts = HostFactsFromJson(b.at("facts"));
    }
    m.generation = OptInt(b, "generation");
    m.phase = OptStr(b, "phase");
    m.toplevel = OptStr(b, "toplevel");
    m.last_applied = OptInt(b, "lastApplied");
    return Message{m};
  }
  if (type == "status") {
    StatusReport m;
    m.seq = UInt(b, "seq");
    m.generation = Int(b, "generation");
    m.phase = Str(b, "phase");
    m.detail = OptStr(b, "detail");
    m.toplevel = OptStr(b, "toplevel");
    m.reboot_required = OptBool(b, "rebootRequired");
    m.closure_bytes = OptInt(b, "closureBytes");
    m.at = OptInt(b, "at");
    if (b.contains("facts")) {
      if (!b.at("facts").is_object()) return Err("status: facts must be an object");
      m.facts = HostFactsFromJson(b.at("facts"));
    }
    return Message{m};
  }
  if (type == "log") {
    LogLines m;
    m.generation = Int(b, "generation");
    m.stream = Str(b, "stream");
    m.lines = b.at("lines").get<std::vector<std::string>>();
    return Message{m};
  }
  if (type == "welcome") {
    Welcome m;
    m.machine = Str(b, "machine");
    m.server_time = OptInt(b, "serverTime");
    return Message{m};
  }
  if (type == "deploy") {
    Deploy m;
    m.manifest.manifest = Str(b, "manifest");
    m.manifest.signer = Str(b, "signer");
    m.manifest.signature = Str(b, "signature");
    m.vars = OptStr(b, "vars");
    return Message{m};
  }
  if (type == "ack") return Message{Ack{UInt(b, "seq")}};
  if (type == "error") return Message{ErrorMsg{Str(b, "code"), Str(b, "message")}};
  if (type == "request") {
    Request m;
    m.id = UInt(b, "id");
    m.method = Str(b, "method");
    if (b.contains("params")) {
      if (!b.at("params").is_object()) return Err("request: params must be an object");
      m.params = std::move(b.at("params"));
    }
    return Message{std::move(m)};
  }
  if (type == "response") {
    Response m;
    m.id = UInt(b, "id");
    m.ok = b.at("ok").get<bool>();
    if (m.ok) {
      if (b.contains("result")) m.result = std::move(b.at("result"));
    } else {
      m.error = Str(b, "error");
    }
    return Message{std::move(m)};
  }
  if (type == "event") {
    Event m;
    m.topic = Str(b, "topic");
    if (b.contains("data")) m.data = std::move(b.at("data"));
    return Message{std::move(m)};
  }
  if (type == "enroll") return Message{Enroll{Str(b, "machine"), Str(b, "proof")}};
  if (type == "enrolled") return Message{Enrolled{Str(b, "machine")}};
  if (type == "fetch") {
    Fetch m{UInt(b, "id"), Str(b, "name"), UInt(b, "offset"), UInt(b, "length")};
    if (m.name.size() > 512) return Err("fetch: name longer than 512 bytes");
    return Message{m};
  }
  if (type == "fetched") {
    Fetched m;
    m.id = UInt(b, "id");
    m.status = static_cast<int>(Int(b, "status"));
    if (m.status != 200 && m.status != 404 && m.status != 500) {
      return Err("fetched: status must be 200, 404 or 500");
    }
    m.offset = UInt(b, "offset");
    m.total = UInt(b, "total");
    auto data = Base64Decode(OptStr(b, "data"));
    if (!data) return Err("fetched: data is not base64");
    m.data = std::move(*data);
    m.error = OptStr(b, "error");
    return Message{m};
  }
  if (type == "preview") {
    Preview m;
    m.id = Str(b, "id");
    m.manifest = {Str(b, "manifest"), Str(b, "signer"), Str(b, "signature")};
    return Message{m};
  }
  if (type == "preview-report") {
    PreviewReport m;
    m.id = Str(b, "id");
    m.error = OptStr(b, "error");
    m.toplevel = OptStr(b, "toplevel");
    m.current = OptStr(b, "current");
    m.fetch_paths = OptInt(b, "fetchPaths");
    m.download_bytes = OptInt(b, "downloadBytes");
    m.unpacked_bytes = OptInt(b, "unpackedBytes");
    m.added_count = OptInt(b, "addedCount");
    m.removed_count = OptInt(b, "removedCount");
    m.added = StrList(b, "added");
    m.removed = StrList(b, "removed");
    if (auto it = b.find("versions"); it != b.end() && !it->is_null()) {
      if (!it->is_array() || it->size() > kMaxPreviewItems) {
        return Err("preview-report: versions must be a list of at most " +
                   std::to_string(kMaxPreviewItems));
      }
      for (const auto& v : *it) {
        if (!v.is_object()) return Err("preview-report: each version change is an object");
        m.versions.push_back({Str(v, "name"), OptStr(v, "before"), OptStr(v, "after")});
      }
    }
    if (auto it = b.find("units"); it != b.end() && !it->is_null()) {
      if (!it->is_object()) return Err("preview-report: units must be an object");
      m.units_stop = StrList(*it, "stop");
      m.units_reload = StrList(*it, "reload");
      m.units_restart = StrList(*it, "restart");
      m.units_start = StrList(*it, "start");
    }
    m.reboot_required = OptBool(b, "rebootRequired");
    m.at = OptInt(b, "at");
    return Message{m};
  }
  return Err("unknown message type '" + CutUtf8(type, 40) + "'");
}

}  // namespace

json ToJson(const HostFacts& f) {
  return {{"system", f.system},
          {"os", f.os},
          {"osVersion", f.os_version},
          {"hostname", f.hostname},
          {"kernel", f.kernel}};
}

json ToJson(const PreviewReport& m) {
  json versions = json::array();
  for (const auto& v : m.versions) {
    versions.push_back({{"name", v.name}, {"before", v.before}, {"after", v.after}});
  }
  return {{"id", m.id},
          {"error", m.error},
          {"toplevel", m.toplevel},
          {"current", m.current},
          {"fetchPaths", m.fetch_paths},
          {"downloadBytes", m.download_bytes},
          {"unpackedBytes", m.unpacked_bytes},
          {"addedCount", m.added_count},
          {"removedCount", m.removed_count},
          {"added", m.added},
          {"removed", m.removed},
          {"versions", versions},
          {"units",
           {{"stop", m.units_stop},
            {"reload", m.units_reload},
            {"restart", m.units_restart},
            {"start", m.units_start}}},
          {"rebootRequired", m.reboot_required},
          {"at", m.at}};
}

HostFacts HostFactsFromJson(const json& j) {
  HostFacts f;
  auto get = [&](const char* k) {
    auto it = j.find(k);
    return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
  };
  f.system = get("system");
  f.os = get("os");
  f.os_version = get("osVersion");
  f.hostname = get("hostname");
  f.kernel = get("kernel");
  return f;
}

std::string_view TypeName(const Message& m) {
  return std::visit(Overloaded{
                        [](const Hello&) { return std::string_view("hello"); },
                        [](const StatusReport&) { return std::string_view("status"); },
                        [](const LogLines&) { return std::string_view("log"); },
                        [](const Welcome&) { return std::string_view("welcome"); },
                        [](const Deploy&) { return std::string_view("deploy"); },
                        [](const Ack&) { return std::string_view("ack"); },
                        [](const ErrorMsg&) { return std::string_view("error"); },
                        [](const Request&) { return std::string_view("request"); },
                        [](const Response&) { return std::string_view("response"); },
                        [](const Event&) { return std::string_view("event"); },
                        [](const Enroll&) { return std::string_view("enroll"); },
                        [](const Enrolled&) { return std::string_view("enrolled"); },
                        [](const Fetch&) { return std::string_view("fetch"); },
                        [](const Fetched&) { return std::string_view("fetched"); },
                        [](const Preview&) { return std::string_view("preview"); },
                        [](const PreviewReport&) { return std::string_view("preview-report"); },
                    },
                    m);
}

std::string Encode(const Message& m) {
  json body = std::visit([](const auto& x) { return Body(x); }, m);
  return DumpJson(json{{"v", kVersion}, {"type", TypeName(m)}, {"body", std::move(body)}});
}

BinaryFrame EncodeBinaryParts(Message m) {
  BinaryFrame out;
  if (auto* f = std::get_if<Fetched>(&m)) {
    out.payload = std::move(f->data);
    f->data.clear();
  } else if (auto* r = std::get_if<Request>(&m)) {
    out.payload = std::move(r->payload);
    r->payload.clear();
  }
  std::string header = Encode(m);
  auto n = static_cast<std::uint32_t>(header.size());
  out.head.reserve(4 + header.size());
  out.head.push_back(static_cast<char>((n >> 24) & 0xff));
  out.head.push_back(static_cast<char>((n >> 16) & 0xff));
  out.head.push_back(static_cast<char>((n >> 8) & 0xff));
  out.head.push_back(static_cast<char>(n & 0xff));
  out.head += header;
  return out;
}

std::string EncodeBinary(Message m) {
  // One copy of the payload, appended after the header.
  BinaryFrame f = EncodeBinaryParts(std::move(m));
  f.head.reserve(f.size());
  f.head += f.payload;
  return std::move(f.head);
}

namespace {

Result<Message> DecodeBinary(std::string_view frame, const DecodeLimits& limits) {
  if (frame.size() < 4) return Err("binary frame shorter than its 4-byte header length");
  std::uint32_t n = 0;
  for (int i = 0; i < 4; ++i)
    n = (n << 8) | static_cast<unsigned char>(frame[static_cast<std::size_t>(i)]);
  if (n > kMaxBinaryHeaderBytes || n > frame.size() - 4) {
    return Err("binary frame header length " + std::to_string(n) + " exceeds the frame (" +
               std::to_string(frame.size()) + " bytes) or " +
               std::to_string(kMaxBinaryHeaderBytes) + " bytes");
  }
  std::string_view header = frame.substr(4, n);
  std::string_view payload = frame.substr(4 + n);
  if (!header.empty() && header.front() == '\0') return Err("binary frame header is not JSON");
  DecodeLimits hl = limits;
  hl.max_bytes = std::min<std::size_t>(limits.max_bytes, kMaxBinaryHeaderBytes);
  auto msg = Decode(header, hl);
  if (!msg) return msg;
  if (auto* f = std::get_if<Fetched>(&*msg)) {
    if (!f->data.empty()) return Err("fetched: data both in the header and as payload");
    f->data.assign(payload);
  } else if (auto* r = std::get_if<Request>(&*msg)) {
    r->payload.assign(payload);
  } else if (!payload.empty()) {
    return Err("a binary '" + std::string(TypeName(*msg)) + "' frame may not carry a payload");
  }
  return msg;
}

}  // namespace

Result<Message> Decode(std::string_view text, const DecodeLimits& limits) {
  if (!text.empty() && text.front() == '\0') return DecodeBinary(text, limits);
  auto parsed = ParseJsonBounded(text, limits.max_bytes, limits.max_depth);
  if (!parsed) return parsed.error();
  try {
    json& j = *parsed;
    if (!j.is_object()) return Err("message is not a JSON object");
    auto v = j.find("v");
    if (v == j.end() || !v->is_number_integer()) return Err("message has no protocol version 'v'");
    if (v->get<std::int64_t>() != kVersion) {
      return Err("protocol version " + v->dump() + " is not supported (this side speaks " +
                 std::to_string(kVersion) + "); upgrade the older side");
    }
    auto t = j.find("type");
    if (t == j.end() || !t->is_string()) return Err("message has no 'type'");
    auto b = j.find("body");
    if (b == j.end() || !b->is_object()) return Err("message has no object 'body'");
    const std::string type = t->get<std::string>();
    return DecodeBody(type, *b);
  } catch (const std::exception& e) {
    return Err(std::string("malformed message: ") + e.what());
  }
}

}  // namespace muster::proto
