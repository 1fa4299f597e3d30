// Fakes and a fixture shared by the controller unit tests (test-only).
#pragma once

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/manifest.h"
#include "common/protocol.h"
#include "common/testutil.h"
#include "controller/fleet.h"
#include "controller/store.h"

namespace muster::testing {

// Records what the fleet sends to a connected agent.
class FakeChannel : public AgentChannel {
 public:
  void Send(std::string text) override {
    std::lock_guard lock(mu);
    sent.push_back(std::move(text));
  }
  void Close(std::string reason) override {
    std::lock_guard lock(mu);
    closed.push_back(std::move(reason));
  }
  std::mutex mu;
  std::vector<std::string> sent;
  std::vector<std::string> closed;
};

// Records events delivered to a subscribed operator.
class FakeSink : public EventSink {
 public:
  void Deliver(std::string text) override {
    auto m = proto::Decode(text);
    ASSERT_TRUE(m.ok()) << m.message();
    events.push_back(std::get<proto::Event>(*m));
  }
  std::vector<proto::Event> events;
  std::vector<std::string> Topics() const {
    std::vector<std::string> t;
    for (const auto& e : events) t.push_back(e.topic);
    return t;
  }
};

// A Fleet over a real SqliteStore in a temporary directory, with a fixed clock,
// one operator ("alice") and one machine ("web1") registered.
class FleetTest : public ::testing::Test {
 protected:
  static constexpr std::int64_t kNow = 1717200000000;
  static constexpr const char* kToplevel =
      "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-24.05";

  void SetUp() override {
    InitCrypto();
    spdlog::set_level(spdlog::level::warn);
    auto s = OpenSqliteStore((dir_ / "muster.db").string());
    ASSERT_TRUE(s.ok()) << s.message();
    store_ = std::move(*s);
    fleet_ = std::make_unique<Fleet>(*store_, [this] { return now_; });
    ASSERT_TRUE(fleet_->Load().ok());
    ASSERT_TRUE(fleet_->AddOperator("alice", alice_.public_key().ToText()).ok());
    ASSERT_TRUE(fleet_->AddMachine("web1", web1_.public_key().ToText(), {"web"}).ok());
  }

  // A deploy for machine/generation signed by `signer`, with sealed vars.
  proto::Deploy MakeDeploy(std::int64_t generation, const std::string& machine = "web1",
                           const SecretKey* signer = nullptr, bool with_vars = true) {
    std::string sealed;
    if (with_vars) sealed = SealTo(web1_.public_key(), "{\"format\":1,\"files\":[]}").value();
    Manifest m;
    m.machine = machine;
    m.generation = generation;
    m.toplevel = kToplevel;
    m.kind = Kind::kNixos;
    m.substituters = {"https://cache.nixos.org"};
    m.trusted_public_keys = {"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="};
    m.vars_hash = VarsHash(sealed);
    m.created_at = 1717200000;
    proto::Deploy d;
    d.manifest = SignManifest(m, signer ? *signer : alice_);
    d.vars = sealed.empty() ? "" : Base64Encode(sealed);
    return d;
  }

  // An enrolment grant for machine signed by alice, live for ttl_ms.
  Status AddGrant(const std::string& machine, std::int64_t ttl_ms) {
    RosterEntry e;
    e.machine = machine;
    e.enroll_key = SecretKey::Generate().public_key().ToText();
    e.signed_at = now_;
    e.expires_at = now_ + ttl_ms;
    return fleet_->AddEnrollGrant(SignRosterEntry(e, alice_), "alice");
  }

  static proto::Hello MakeHello(std::int64_t last_applied = 0, std::int64_t generation = 0,
                                const std::string& phase = "idle",
                                const std::string& machine = "web1") {
    proto::Hello h;
    h.machine = machine;
    h.agent_version = "0.1.0";
    h.facts.system = "x86_64-linux";
    h.facts.os = "nixos";
    h.generation = generation;
    h.phase = phase;
    h.last_applied = last_applied;
    return h;
  }

  static proto::Message Decoded(const std::string& text) {
    auto m = proto::Decode(text);
    EXPECT_TRUE(m.ok()) << m.message();
    return m.ok() ? *m : proto::Message{};
  }

  TempDir dir_;
  std::int64_t now_ = kNow;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Fleet> fleet_;
  SecretKey alice_ = SecretKey::FromSeed(std::string(32, 'a')).value();
  SecretKey web1_ = SecretKey::FromSeed(std::string(32, 'w')).value();
  SecretKey mallory_ = SecretKey::FromSeed(std::string(32, 'm')).value();
};

}  // namespace muster::testing
