#include "common/protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

#include "common/golden_samples.h"
#include "common/testutil.h"

namespace muster::proto {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

// One sample of every message type, as it appears in tests/data/protocol/<type>.json.
PreviewReport GoldenPreviewReport() {
  PreviewReport r;
  r.id = "p1a2b3c4";
  r.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-24.11";
  r.current = "/nix/store/00000000000000000000000000000000-nixos-system-web1-24.05";
  r.fetch_paths = 3;
  r.download_bytes = 1048576;
  r.unpacked_bytes = 4194304;
  r.added_count = 3;
  r.removed_count = 2;
  r.added = {"openssh-9.8p1", "linux-6.6.30", "nixos-system-web1-24.11"};
  r.removed = {"openssh-9.7p1", "linux-6.6.29"};
  r.versions = {{"openssh", "9.7p1", "9.8p1"}, {"htop", "", "3.3.0"}};
  r.units_restart = {"sshd.service"};
  r.units_reload = {"dbus.service"};
  r.units_start = {"htop-exporter.service"};
  r.units_stop = {"old.service"};
  r.reboot_required = true;
  r.at = 1717200000000;
  return r;
}

std::vector<Message> Samples() {
  Hello hello;
  hello.machine = "web1";
  hello.agent_version = "0.1.0";
  hello.facts = {"x86_64-linux", "nixos", "24.05.20240601.abcdef0 (Uakari)", "web1", "6.6.32"};
  hello.generation = 11;
  hello.phase = "succeeded";
  hello.toplevel = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-nixos-system-web1-24.05";
  hello.last_applied = 11;

  StatusReport status;
  status.seq = 7;
  status.generation = 12;
  status.phase = "activating";
  status.detail = "switch-to-configuration switch";
  status.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-24.05";
  status.reboot_required = true;
  status.closure_bytes = 1234567890;
  status.at = 1717200012345;

  LogLines log;
  log.generation = 12;
  log.stream = "realise";
  log.lines = {"copying path '/nix/store/…-linux-6.6.32' from 'https://cache.nixos.org'...", "",
               "unicode ✓ and \"quotes\""};

  Request request;
  request.id = 3;
  request.method = "publish";
  request.params = {{"manifest", "{}"}, {"signer", "ed25519:AAAA"}, {"tags", {"web", "eu"}}};

  Response response;
  response.id = 3;
  response.ok = true;
  response.result = {{"machine", "web1"}, {"generation", 12}, {"online", true}};

  Event event;
  event.topic = "status";
  event.data = {{"machine", "web1"}, {"generation", 12}, {"phase", "succeeded"}};

  return {hello,
          status,
          log,
          Welcome{"web1", 1717200000000},
          testing::GoldenDeploy(),
          Ack{7},
          ErrorMsg{"bad-message", "status report has unknown phase 'dancing'"},
          request,
          response,
          event,
          Enroll{"web2", "c2lnbmF0dXJlLW9mLXRoZS1tYWNoaW5lLWtleQ=="},
          Enrolled{"web2"},
          Fetch{9, "nar/0a1b2c3d4e5f6g7h8i9jakalamanapaq-1b2c.nar.zst", 1048576, 524288},
          Fetched{9, 200, 1048576, 3145728, std::string("\x28\xb5\x2f\xfd NAR bytes", 14), ""},
          testing::GoldenPreview(),
          GoldenPreviewReport()};
}

const std::vector<std::string> kTypes = {
    "hello",    "status", "log",    "welcome",  "deploy", "ack",     "error",   "request",
    "response", "event",  "enroll", "enrolled", "fetch",  "fetched", "preview", "preview-report"};

Message DecodeOk(const std::string& text) {
  auto r = Decode(text);
  EXPECT_TRUE(r.ok()) << r.message() << "\n" << text;
  return r.ok() ? *r : Message{};
}

TEST(Protocol, EveryTypeHasASample) {
  auto samples = Samples();
  ASSERT_EQ(samples.size(), std::variant_size_v<Message>);
  for (size_t i = 0; i < samples.size(); ++i) {
    EXPECT_EQ(samples[i].index(), i);
    EXPECT_EQ(TypeName(samples[i]), kTypes[i]);
  }
}

TEST(Protocol, EncodeDecodeRoundTripEveryType) {
  for (const Message& m : Samples()) {
    std::string text = Encode(m);
    json j = json::parse(text);
    EXPECT_EQ(j["v"], kVersion);
    EXPECT_EQ(j["type"], TypeName(m));
    EXPECT_TRUE(j["body"].is_object());
    Message back = DecodeOk(text);
    EXPECT_EQ(back.index(), m.index()) << TypeName(m);
    EXPECT_EQ(Encode(back), text) << TypeName(m);
  }
}

TEST(Protocol, DecodedFieldsMatch) {
  auto samples = Samples();
  auto hello = std::get<Hello>(DecodeOk(Encode(samples[0])));
  EXPECT_EQ(hello.machine, "web1");
  EXPECT_EQ(hello.facts.os_version, "24.05.20240601.abcdef0 (Uakari)");
  EXPECT_EQ(hello.facts.kernel, "6.6.32");
  EXPECT_EQ(hello.last_applied, 11);
  auto status = std::get<StatusReport>(DecodeOk(Encode(samples[1])));
  EXPECT_EQ(status.seq, 7u);
  EXPECT_TRUE(status.reboot_required);
  EXPECT_EQ(status.closure_bytes, 1234567890);
  EXPECT_EQ(status.at, 1717200012345);
  auto log = std::get<LogLines>(DecodeOk(Encode(samples[2])));
  EXPECT_EQ(log.lines, std::get<LogLines>(samples[2]).lines);
  auto deploy = std::get<Deploy>(DecodeOk(Encode(samples[4])));
  EXPECT_EQ(deploy.manifest.manifest, std::get<Deploy>(samples[4]).manifest.manifest);
  EXPECT_EQ(deploy.manifest.signature, std::get<Deploy>(samples[4]).manifest.signature);
  EXPECT_EQ(deploy.vars, std::get<Deploy>(samples[4]).vars);
  auto request = std::get<Request>(DecodeOk(Encode(samples[7])));
  EXPECT_EQ(request.params["tags"][1], "eu");

  Response failed;
  failed.id = 9;
  failed.ok = false;
  failed.error = "no machine named 'x'";
  json fj = json::parse(Encode(failed));
  EXPECT_FALSE(fj["body"].contains("result"));
  auto back = std::get<Response>(DecodeOk(Encode(failed)));
  EXPECT_FALSE(back.ok);
  EXPECT_EQ(back.error, "no machine named 'x'");
  EXPECT_EQ(back.id, 9u);

  Ack big{std::numeric_limits<std::uint64_t>::max()};
  EXPECT_EQ(std::get<Ack>(DecodeOk(Encode(big))).seq, big.seq);
}

TEST(Protocol, OptionalFieldsDefaultAndUnknownFieldsAreIgnored) {
  auto hello = std::get<Hello>(DecodeOk(
      R"({"v":1,"type":"hello","body":{"machine":"m","agentVersion":"9","future":[1,2],"phase":null}})"));
  EXPECT_EQ(hello.machine, "m");
  EXPECT_EQ(hello.generation, 0);
  EXPECT_EQ(hello.phase, "");
  EXPECT_EQ(hello.facts.system, "");
  auto req =
      std::get<Request>(DecodeOk(R"({"v":1,"type":"request","body":{"id":1,"method":"x"}})"));
  EXPECT_TRUE(req.params.is_object());
  EXPECT_TRUE(req.params.empty());
  auto facts = std::get<Hello>(DecodeOk(
      R"({"v":1,"type":"hello","body":{"machine":"m","agentVersion":"9","facts":{"os":5,"kernel":"k"}}})"));
  EXPECT_EQ(facts.facts.os, "") << "non-string facts are dropped, not fatal";
  EXPECT_EQ(facts.facts.kernel, "k");
}

TEST(Protocol, GoldenFiles) {
  auto samples = Samples();
  for (size_t i = 0; i < kTypes.size(); ++i) {
    SCOPED_TRACE(kTypes[i]);
    auto path = testing::TestData("protocol/" + kTypes[i] + ".json");
    if (testing::UpdateGolden()) {
      testing::Spit(path, json::parse(Encode(samples[i])).dump(2) + "\n");
    }
    std::string text = testing::Slurp(path);
    auto m = Decode(text);
    ASSERT_TRUE(m.ok()) << m.message();
    EXPECT_EQ(TypeName(*m), kTypes[i]);
    // Decoding and re-encoding the file reproduces it: a wire change is a diff here.
    EXPECT_EQ(json::parse(Encode(*m)), json::parse(text));
    // And the file is what the code produces for the sample.
    EXPECT_EQ(json::parse(Encode(samples[i])), json::parse(text));
  }
}

TEST(Protocol, GoldenDeployIsGenuine) {
  auto m = Decode(testing::Slurp(testing::TestData("protocol/deploy.json")));
  ASSERT_TRUE(m.ok()) << m.message();
  const auto& d = std::get<Deploy>(*m);
  auto sealed = Base64Decode(d.vars);
  ASSERT_TRUE(sealed.ok());
  VerifyContext ctx{"web1", {testing::GoldenOperatorKey().public_key()}, 11};
  auto manifest = VerifySignedManifest(d.manifest, ctx, *sealed);
  ASSERT_TRUE(manifest.ok()) << manifest.message();
  // The signed text is exactly the compact form of manifest.json.
  EXPECT_EQ(d.manifest.manifest,
            json::parse(testing::Slurp(testing::TestData("manifest.json"))).dump());
  auto plain = testing::GoldenMachineKey().OpenSealed(*sealed);
  ASSERT_TRUE(plain.ok()) << plain.message();
  EXPECT_EQ(json::parse(*plain),
            json::parse(testing::Slurp(testing::TestData("vars_bundle.json"))));
}

std::string Env(const std::string& type, const json& body) {
  return json{{"v", 1}, {"type", type}, {"body", body}}.dump();
}

TEST(Protocol, DecodeErrors) {
  std::string deep = R"({"v":1,"type":"request","body":{"id":1,"method":"m","params":{"a":)" +
                     std::string(40, '[') + std::string(40, ']') + "}}}";
  struct Case {
    const char* name;
    std::string text;
    std::string want;
  } cases[] = {
      {"empty", "", "malformed JSON"},
      {"garbage", "hello", "malformed JSON"},
      {"truncated", R"({"v":1,"type":"ack","body":{"seq":1})", "malformed JSON"},
      {"array", "[1]", "not a JSON object"},
      {"string", "\"x\"", "not a JSON object"},
      {"no version", R"({"type":"ack","body":{"seq":1}})", "no protocol version 'v'"},
      {"version string", R"({"v":"1","type":"ack","body":{"seq":1}})", "no protocol version"},
      {"version float", R"({"v":1.0,"type":"ack","body":{"seq":1}})", "no protocol version"},
      {"version 2", R"({"v":2,"type":"ack","body":{"seq":1}})",
       "protocol version 2 is not supported (this side speaks 1); upgrade the older side"},
      {"version 0", R"({"v":0,"type":"ack","body":{"seq":1}})", "version 0 is not supported"},
      {"no type", R"({"v":1,"body":{}})", "no 'type'"},
      {"type number", R"({"v":1,"type":3,"body":{}})", "no 'type'"},
      {"unknown type", Env("reboot", json::object()), "unknown message type 'reboot'"},
      {"long unknown type", Env(std::string(100, 't'), json::object()),
       "unknown message type '" + std::string(40, 't') + "'"},
      {"no body", R"({"v":1,"type":"ack"})", "no object 'body'"},
      {"body array", R"({"v":1,"type":"ack","body":[]})", "no object 'body'"},
      // Missing required fields, per type.
      {"hello no machine", Env("hello", {{"agentVersion", "1"}}), "malformed message"},
      {"hello no version", Env("hello", {{"machine", "m"}}), "malformed message"},
      {"status no seq", Env("status", {{"generation", 1}, {"phase", "idle"}}), "malformed"},
      {"status no phase", Env("status", {{"seq", 1}, {"generation", 1}}), "malformed"},
      {"status no generation", Env("status", {{"seq", 1}, {"phase", "idle"}}), "malformed"},
      {"log no lines", Env("log", {{"generation", 1}, {"stream", "realise"}}), "malformed"},
      {"log no stream", Env("log", {{"generation", 1}, {"lines", json::array()}}), "malformed"},
      {"welcome no machine", Env("welcome", {{"serverTime", 1}}), "malformed"},
      {"deploy no signature", Env("deploy", {{"manifest", "{}"}, {"signer", "k"}}), "malformed"},
      {"deploy no manifest", Env("deploy", {{"signature", "s"}, {"signer", "k"}}), "malformed"},
      {"ack no seq", Env("ack", json::object()), "malformed"},
      {"error no message", Env("error", {{"code", "x"}}), "malformed"},
      {"request no method", Env("request", {{"id", 1}}), "malformed"},
      {"request no id", Env("request", {{"method", "m"}}), "malformed"},
      {"response no ok", Env("response", {{"id", 1}}), "malformed"},
      {"failed response no error", Env("response", {{"id", 1}, {"ok", false}}), "malformed"},
      {"event no topic", Env("event", {{"data", json::object()}}), "malformed"},
      // Wrong types.
      {"hello machine number", Env("hello", {{"machine", 1}, {"agentVersion", "1"}}), "malformed"},
      {"hello facts string",
       Env("hello", {{"machine", "m"}, {"agentVersion", "1"}, {"facts", "x"}}),
       "hello: facts must be an object"},
      {"hello generation string",
       Env("hello", {{"machine", "m"}, {"agentVersion", "1"}, {"generation", "3"}}),
       "generation must be an integer"},
      {"hello lastApplied float",
       Env("hello", {{"machine", "m"}, {"agentVersion", "1"}, {"lastApplied", 1.5}}),
       "lastApplied must be an integer"},
      {"status seq negative", Env("status", {{"seq", -1}, {"generation", 1}, {"phase", "x"}}),
       "seq must be a non-negative integer"},
      {"status seq string", Env("status", {{"seq", "1"}, {"generation", 1}, {"phase", "x"}}),
       "seq must be a non-negative integer"},
      {"status generation float", Env("status", {{"seq", 1}, {"generation", 2.5}, {"phase", "x"}}),
       "generation must be an integer"},
      {"status reboot string",
       Env("status", {{"seq", 1}, {"generation", 2}, {"phase", "x"}, {"rebootRequired", "yes"}}),
       "malformed"},
      {"log lines numbers", Env("log", {{"generation", 1}, {"stream", "s"}, {"lines", {1, 2}}}),
       "malformed"},
      {"log lines string", Env("log", {{"generation", 1}, {"stream", "s"}, {"lines", "x"}}),
       "malformed"},
      {"ack seq float", Env("ack", {{"seq", 1.0}}), "seq must be a non-negative integer"},
      {"ack seq bool", Env("ack", {{"seq", true}}), "seq must be a non-negative integer"},
      {"request params array", Env("request", {{"id", 1}, {"method", "m"}, {"params", {1}}}),
       "request: params must be an object"},
      {"request id negative", Env("request", {{"id", -5}, {"method", "m"}}),
       "id must be a non-negative integer"},
      {"response ok string", Env("response", {{"id", 1}, {"ok", "true"}}), "malformed"},
      {"deploy vars number",
       Env("deploy", {{"manifest", "{}"}, {"signer", "k"}, {"signature", "s"}, {"vars", 5}}),
       "malformed"},
      // Limits.
      {"too deep", deep, "JSON nesting deeper than 32 levels"},
      {"oversize",
       Env("log", {{"generation", 1},
                   {"stream", "s"},
                   {"lines", {std::string(kDefaultMaxMessageBytes, 'x')}}}),
       "exceeds the limit of 1048576 bytes"},
  };
  for (const auto& c : cases) {
    Result<Message> r = Message{};
    EXPECT_NO_THROW(r = Decode(c.text)) << c.name;
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.name;
  }
}

TEST(Protocol, DecodeHonoursLimits) {
  std::string text = Encode(Ack{1});
  EXPECT_TRUE(Decode(text, {text.size(), 2}).ok());
  auto small = Decode(text, {text.size() - 1, 2});
  ASSERT_FALSE(small.ok());
  EXPECT_THAT(small.message(), HasSubstr("exceeds the limit"));
  auto shallow = Decode(text, {text.size(), 1});
  ASSERT_FALSE(shallow.ok());
  EXPECT_THAT(shallow.message(), HasSubstr("nesting deeper than 1"));
}

TEST(Protocol, EncodeNeverThrowsOnIllFormedUtf8) {
  // A string that missed SanitizeUtf8 is encoded with U+FFFD, not thrown on.
  StatusReport r;
  r.phase = "failed";
  r.detail = "stderr: \xE2\x82";
  std::string text;
  ASSERT_NO_THROW(text = Encode(r));
  auto back = Decode(text);
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(std::get<StatusReport>(*back).detail, "stderr: \xEF\xBF\xBD");
  LogLines l{1, "activate", {"ok", "\xC0\xAF", std::string("\xF0\x9F\x98")}};
  ASSERT_NO_THROW(text = Encode(l));
  ASSERT_TRUE(Decode(text).ok());
}

TEST(Protocol, DecodeNeverThrowsOnMutations) {
  // Every prefix and a byte flip at every position of every sample: Decode may
  // fail but must return.
  for (const Message& m : Samples()) {
    std::string text = Encode(m);
    if (text.size() > 2000) text.resize(2000);
    for (size_t i = 0; i <= text.size(); ++i) {
      EXPECT_NO_THROW((void)Decode(text.substr(0, i)));
      if (i < text.size()) {
        std::string flipped = text;
        flipped[i] = static_cast<char>(flipped[i] ^ 0x55);
        EXPECT_NO_THROW((void)Decode(flipped));
      }
    }
  }
}

TEST(Protocol, BinaryFramesCarryBytesAfterAJsonHeader) {
  std::string bytes("\x28\xb5\x2f\xfd\0\x01 NAR bytes", 16);
  Fetched f{9, 200, 1048576, 3145728, bytes, ""};
  std::string frame = EncodeBinary(f);
  ASSERT_GE(frame.size(), 4u);
  std::size_t n = (std::size_t(static_cast<unsigned char>(frame[0])) << 24) |
                  (std::size_t(static_cast<unsigned char>(frame[1])) << 16) |
                  (std::size_t(static_cast<unsigned char>(frame[2])) << 8) |
                  std::size_t(static_cast<unsigned char>(frame[3]));
  ASSERT_EQ(frame.size(), 4 + n + bytes.size());
  json header = json::parse(frame.substr(4, n));
  EXPECT_EQ(header["type"], "fetched");
  EXPECT_EQ(header["body"]["data"], "") << "the bytes are not in the header";
  EXPECT_EQ(frame.substr(4 + n), bytes);
  auto back = Decode(frame);
  ASSERT_TRUE(back.ok()) << back.message();
  const auto& g = std::get<Fetched>(*back);
  EXPECT_EQ(g.data, bytes);
  EXPECT_EQ(g.offset, 1048576u);
  EXPECT_EQ(g.total, 3145728u);

  Request r;
  r.id = 4;
  r.method = "cache.upload";
  r.params = {{"offset", 0}};
  r.payload = bytes;
  auto rb = Decode(EncodeBinary(r));
  ASSERT_TRUE(rb.ok()) << rb.message();
  EXPECT_EQ(std::get<Request>(*rb).payload, bytes);
  EXPECT_EQ(std::get<Request>(*rb).params["offset"], 0);
  // A text request never carries a payload.
  EXPECT_TRUE(std::get<Request>(DecodeOk(Encode(r))).payload.empty());
}

TEST(Protocol, AFrameInTwoPartsIsTheSameFrameWithItsPayloadMovedNotCopied) {
  std::string bytes(1 << 20, 'n');
  const char* where = bytes.data();
  Fetched f{3, 200, 0, 1 << 20, std::move(bytes), ""};
  std::string whole = EncodeBinary(f);
  BinaryFrame parts = EncodeBinaryParts(std::move(f));
  EXPECT_EQ(parts.payload.data(), where) << "the payload's buffer is the message's own";
  EXPECT_EQ(parts.size(), whole.size());
  EXPECT_EQ(parts.head + parts.payload, whole);
  auto back = Decode(parts.head + parts.payload);
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(std::get<Fetched>(*back).data.size(), 1u << 20);
}

TEST(Protocol, MalformedBinaryFramesAreRefused) {
  std::string ack = Encode(Ack{7});
  auto frame = [](std::uint32_t n, std::string_view rest) {
    std::string f;
    for (int s = 24; s >= 0; s -= 8) f.push_back(static_cast<char>((n >> s) & 0xff));
    return f + std::string(rest);
  };
  struct Case {
    std::string name, bytes, why;
  } cases[] = {
      {"shorter than its length", std::string("\0\0", 2), "shorter"},
      {"length beyond the frame", frame(500, "{}"), "exceeds the frame"},
      {"length beyond the cap", frame(0xffffff, "{}"), "exceeds the frame"},
      {"header not JSON", frame(3, "abc"), ""},
      {"payload on an ack", frame(static_cast<std::uint32_t>(ack.size()), ack + "xyz"),
       "may not carry a payload"},
      {"data twice",
       frame(static_cast<std::uint32_t>(Encode(Fetched{1, 200, 0, 2, "ab", ""}).size()),
             Encode(Fetched{1, 200, 0, 2, "ab", ""}) + "ab"),
       "both in the header"},
  };
  for (const auto& c : cases) {
    auto r = Decode(c.bytes);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), ::testing::HasSubstr(c.why)) << c.name;
  }
  // An ack as a binary frame without payload is just an ack.
  auto plain = Decode(frame(static_cast<std::uint32_t>(ack.size()), ack));
  ASSERT_TRUE(plain.ok()) << plain.message();
  EXPECT_EQ(std::get<Ack>(*plain).seq, 7u);
}

}  // namespace
}  // namespace muster::proto
