#include "agent/preview.h"

#include <gtest/gtest.h>

#include <map>

namespace muster {
namespace {

const std::string S = "/nix/store/";
std::string P(const std::string& hash_char, const std::string& name) {
  return S + std::string(32, hash_char[0]) + "-" + name;
}

TEST(Preview, ParsesStoreNamesAsNixDoes) {
  struct Case {
    std::string path, name, version;
  } cases[] = {
      {P("a", "openssh-9.8p1"), "openssh", "9.8p1"},
      {P("b", "linux-6.6.30-modules"), "linux", "6.6.30-modules"},
      {P("c", "nixos-system-web1-24.11.20241201.abcdef"), "nixos-system-web1",
       "24.11.20241201.abcdef"},
      {P("d", "etc"), "etc", ""},
      {P("e", "python3.11-requests-2.31.0"), "python3.11-requests", "2.31.0"},
      {P("f", "unit-sshd.service"), "unit-sshd.service", ""},
  };
  for (const auto& c : cases) {
    auto n = ParseStoreName(c.path);
    EXPECT_EQ(n.name, c.name) << c.path;
    EXPECT_EQ(n.version, c.version) << c.path;
  }
  EXPECT_EQ(StorePathName(P("a", "openssh-9.8p1")), "openssh-9.8p1");
}

TEST(Preview, DiffsVersionsLikeNvd) {
  std::vector<std::string> before = {P("a", "openssh-9.7p1"), P("b", "bash-5.2p26"),
                                     P("c", "htop-3.2.0"), P("d", "etc")};
  std::vector<std::string> after = {P("e", "openssh-9.8p1"), P("b", "bash-5.2p26"),
                                    P("f", "curl-8.9.1"), P("g", "etc"), P("h", "curl-8.9.1-bin")};
  auto d = DiffVersions(before, after);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].name, "curl");
  EXPECT_EQ(d[0].before, "");
  EXPECT_EQ(d[0].after, "8.9.1, 8.9.1-bin");
  EXPECT_EQ(d[1].name, "htop");
  EXPECT_EQ(d[1].before, "3.2.0");
  EXPECT_EQ(d[1].after, "");
  EXPECT_EQ(d[2].name, "openssh");
  EXPECT_EQ(d[2].before, "9.7p1");
  EXPECT_EQ(d[2].after, "9.8p1");
}

TEST(Preview, ParsesDryActivateOutput) {
  const char* out =
      "stopping the following units: x\n"  // not a dry-activate line: ignored
      "would stop the following units: old.service, gone.socket\n"
      "would NOT stop the following changed units: getty@tty1.service\n"
      "would activate the configuration...\n"
      "would restart systemd\n"
      "would reload the following units: dbus.service\n"
      "would restart the following units: sshd.service, nginx.service\r\n"
      "would start the following units: new.service\n"
      "would restart the following units: sshd.service, chronyd.service\n";
  proto::PreviewReport r;
  ParseDryActivate(out, &r);
  EXPECT_EQ(r.units_stop, (std::vector<std::string>{"old.service", "gone.socket"}));
  EXPECT_EQ(r.units_reload, (std::vector<std::string>{"dbus.service"}));
  EXPECT_EQ(r.units_restart, (std::vector<std::string>{"systemd", "sshd.service", "nginx.service",
                                                       "chronyd.service"}));
  EXPECT_EQ(r.units_start, (std::vector<std::string>{"new.service"}));
}

// SystemOps with scripted answers; records what was asked.
class FakeOps : public SystemOps {
 public:
  std::string active;
  std::map<std::string, std::vector<std::string>> closures;
  std::string dry_output;
  bool realise_ok = true;
  std::vector<std::string> calls;

  Kind DetectKind(const std::string&) override { return Kind::kNixos; }
  std::string ActiveToplevel() override { return active; }
  Result<std::int64_t> Realise(const Manifest& m, const LineSink&) override {
    calls.push_back("realise " + m.toplevel);
    if (!realise_ok) return Err("not enough free space in /nix/store");
    return std::int64_t{1};
  }
  Result<FetchEstimate> EstimateFetch(const Manifest&) override {
    return FetchEstimate{true, 2, 1000, 5000};
  }
  Result<std::vector<std::string>> Closure(const std::string& p) override { return closures[p]; }
  Result<std::string> DryActivate(const std::string& t, const LineSink&) override {
    calls.push_back("dry-activate " + t);
    return dry_output;
  }
  Status SetProfile(const std::string&, const LineSink&) override {
    calls.push_back("set-profile");
    return Status::Ok();
  }
  ActivateOutcome Activate(Kind, const std::string&, Action, const std::string&,
                           const LineSink&) override {
    calls.push_back("activate");
    return {Status::Ok()};
  }
  ActivationEvidence ActivationResult(const std::string&, std::string*) override {
    return ActivationEvidence::kUnknown;
  }
  void Interrupt() override {}
  bool RebootRequired(const std::string&) override { return true; }
  Status Reboot() override {
    calls.push_back("reboot");
    return Status::Ok();
  }
};

TEST(Preview, RunPreviewReportsAndChangesNothing) {
  FakeOps ops;
  const std::string cur = P("1", "nixos-system-web1-24.05"),
                    next = P("2", "nixos-system-web1-24.11");
  ops.active = cur;
  ops.closures[cur] = {cur, P("a", "openssh-9.7p1"), P("b", "bash-5.2p26")};
  ops.closures[next] = {next, P("c", "openssh-9.8p1"), P("b", "bash-5.2p26")};
  ops.dry_output = "would restart the following units: sshd.service\n";
  Manifest m;
  m.machine = "web1";
  m.toplevel = next;
  m.action = Action::kDryActivate;
  auto r = RunPreview(m, ops, nullptr);
  EXPECT_EQ(r.error, "");
  EXPECT_EQ(r.current, cur);
  EXPECT_EQ(r.fetch_paths, 2);
  EXPECT_EQ(r.download_bytes, 1000);
  EXPECT_EQ(r.unpacked_bytes, 5000);
  EXPECT_EQ(r.added_count, 2);
  EXPECT_EQ(r.removed_count, 2);
  ASSERT_EQ(r.versions.size(), 1u) << "toplevels are not packages";
  EXPECT_EQ(r.versions[0].name, "openssh");
  EXPECT_EQ(r.units_restart, std::vector<std::string>{"sshd.service"});
  EXPECT_TRUE(r.reboot_required);
  EXPECT_EQ(ops.calls, (std::vector<std::string>{"realise " + next, "dry-activate " + next}));

  ops.realise_ok = false;
  ops.calls.clear();
  r = RunPreview(m, ops, nullptr);
  EXPECT_EQ(r.error, "realise: not enough free space in /nix/store");
  EXPECT_EQ(ops.calls, std::vector<std::string>{"realise " + next});
}

}  // namespace
}  // namespace muster
