#include "controller/cli/clan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "common/testutil.h"

namespace muster::cli {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The shape of clanInternals.inventoryClass.inventorySerialization.machines.
const json kInventory = json::parse(R"({
  "web1": {"machineClass": "nixos", "tags": ["web", "eu"], "deploy": {"targetHost": "root@web1"}},
  "web2": {"machineClass": "nixos", "tags": ["web", "us"]},
  "laptop": {"machineClass": "nixos", "tags": ["web", "eu"]},
  "mac1": {"machineClass": "darwin", "tags": ["eu"]},
  "db1": {"tags": []}
})");

std::map<std::string, ClanMachine> Inventory() {
  auto inv = ParseClanInventory(kInventory);
  EXPECT_TRUE(inv.ok()) << inv.message();
  return inv.ok() ? *inv : std::map<std::string, ClanMachine>{};
}

// laptop sets clan.core.deployment.requireExplicitUpdate.
Result<bool> Explicit(const std::string& m) { return m == "laptop"; }

TEST(ClanInventory, ParsesMachinesAndComputedTags) {
  auto inv = Inventory();
  ASSERT_EQ(inv.size(), 5u);
  EXPECT_EQ(inv["db1"].machine_class, "nixos") << "clan's default class";
  EXPECT_TRUE(inv["mac1"].HasTag("darwin"));
  EXPECT_FALSE(inv["mac1"].HasTag("nixos"));
  EXPECT_TRUE(inv["db1"].HasTag("all"));
  EXPECT_FALSE(ParseClanInventory(json::array()).ok());
  EXPECT_FALSE(ParseClanInventory(json::parse(R"({"-bad": {}})")).ok());
  auto other = ParseClanInventory(json::parse(R"({"x": {"machineClass": "windows"}})"));
  ASSERT_FALSE(other.ok());
  EXPECT_THAT(other.message(), HasSubstr("machineClass 'windows'"));
}

TEST(ClanTargets, TableLikeClanMachinesUpdate) {
  struct Case {
    const char* name;
    ClanSelection sel;
    std::vector<std::string> want;
    std::vector<std::string> skipped;
    std::string error;
  } cases[] = {
      {"tags are AND-ed", {{}, {"web", "eu"}, false}, {"web1"}, {"laptop"}, ""},
      {"one tag", {{}, {"web"}, false}, {"web1", "web2"}, {"laptop"}, ""},
      {"computed class tag", {{}, {"darwin"}, false}, {"mac1"}, {}, ""},
      {"computed all tag", {{}, {"all", "eu"}, false}, {"mac1", "web1"}, {"laptop"}, ""},
      {"--all skips requireExplicitUpdate",
       {{}, {}, true},
       {"db1", "mac1", "web1", "web2"},
       {"laptop"},
       ""},
      {"named: explicit, so requireExplicitUpdate does not apply",
       {{"laptop", "web2"}, {}, false},
       {"laptop", "web2"},
       {},
       ""},
      {"named and tagged: the names must carry the tags",
       {{"web2"}, {"eu"}, false},
       {},
       {},
       "does not carry the tag 'eu'"},
      {"named and tagged, carried", {{"web1"}, {"web", "eu"}, false}, {"web1"}, {}, ""},
      {"unknown name", {{"nope"}, {}, false}, {}, {}, "not in the clan's inventory"},
      {"no match", {{}, {"web", "darwin"}, false}, {}, {}, "with tags: web AND darwin"},
      {"only explicit machines", {{}, {"web", "eu", "nixos"}, false}, {"web1"}, {"laptop"}, ""},
      {"nothing chosen", {{}, {}, false}, {}, {}, "--tag T (AND-ed, like clan) or --all"},
  };
  auto inv = Inventory();
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<std::string> skipped;
    auto r = ResolveClanTargets(inv, c.sel, Explicit, &skipped);
    if (!c.error.empty()) {
      ASSERT_FALSE(r.ok());
      EXPECT_THAT(r.message(), HasSubstr(c.error));
      continue;
    }
    ASSERT_TRUE(r.ok()) << r.message();
    EXPECT_EQ(*r, c.want);
    EXPECT_EQ(skipped, c.skipped);
  }
  std::vector<std::string> skipped;
  auto only = ResolveClanTargets(
      inv, {{}, {"web", "eu"}, false}, [](const std::string&) -> Result<bool> { return true; },
      &skipped);
  ASSERT_FALSE(only.ok());
  EXPECT_THAT(only.message(), HasSubstr("requireExplicitUpdate; name them"));
  auto failing = ResolveClanTargets(
      inv, {{}, {"web"}, false},
      [](const std::string& m) -> Result<bool> { return Err("cannot evaluate " + m); }, nullptr);
  ASSERT_FALSE(failing.ok());
  EXPECT_THAT(failing.message(), HasSubstr("cannot evaluate"));
}

TEST(ClanVars, SecretStoreDirectories) {
  json facts = {{"sops", "/var/lib/sops-nix"},
                {"passwordStore", "/etc/secret-vars"},
                {"age", "/etc/age-vars"}};
  EXPECT_EQ(ClanVarsDirectory("sops", facts).value(), "/var/lib/sops-nix");
  EXPECT_EQ(ClanVarsDirectory("password-store", facts).value(), "/etc/secret-vars");
  EXPECT_EQ(ClanVarsDirectory("age", facts).value(), "/etc/age-vars");
  auto vm = ClanVarsDirectory("vm", facts);
  ASSERT_FALSE(vm.ok());
  EXPECT_THAT(vm.message(), HasSubstr("use sops, age or password-store"));
  auto c = ParseClanMachineConfig("web1", {{"requireExplicitUpdate", true},
                                           {"secretStore", "password-store"},
                                           {"passwordStore", "/srv/vars"}});
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_TRUE(c->require_explicit_update);
  EXPECT_EQ(c->vars_dir, "/srv/vars");
}

TEST(ClanVars, UploadDirectoryBecomesABundleWithClansModes) {
  testing::TempDir dir;
  std::filesystem::create_directories(dir / "activation/per-machine/app");
  {
    std::ofstream(dir / "key.txt") << "AGE-SECRET-KEY-1";
    std::ofstream(dir / "activation/per-machine/app/token") << "t";
  }
  ::chmod((dir / "key.txt").c_str(), 0600);
  ::chmod((dir / "activation/per-machine/app/token").c_str(), 0644);
  auto b = ClanUploadBundle(dir.path().string(), "/var/lib/sops-nix");
  ASSERT_TRUE(b.ok()) << b.message();
  EXPECT_EQ(b->target, "/var/lib/sops-nix");
  ASSERT_EQ(b->files.size(), 2u);
  for (const auto& f : b->files) {
    EXPECT_EQ(f.mode, 0400u) << f.path;
    EXPECT_EQ(f.owner, "root");
    EXPECT_EQ(f.group, "root");
  }
}

TEST(ClanVars, PlaintextDirIsPrivateAndRemovedWithEverythingInIt) {
  std::string path;
  {
    auto d = PlaintextDir::Create();
    ASSERT_TRUE(d.ok()) << d.message();
    path = (*d)->path();
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    std::filesystem::create_directories(path + "/upload/activation");
    std::ofstream(path + "/upload/key.txt") << "secret";
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace
}  // namespace muster::cli
