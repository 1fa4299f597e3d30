#include "common/vars_bundle.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/crypto.h"
#include "common/golden_samples.h"
#include "common/testutil.h"

namespace muster {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::HasSubstr;

[[maybe_unused]] const bool kCryptoReady = (InitCrypto(), true);

void ExpectSame(const VarsBundle& a, const VarsBundle& b) {
  ASSERT_EQ(a.files.size(), b.files.size());
  for (size_t i = 0; i < a.files.size(); ++i) {
    EXPECT_EQ(a.files[i].path, b.files[i].path);
    EXPECT_EQ(a.files[i].mode, b.files[i].mode) << a.files[i].path;
    EXPECT_EQ(a.files[i].owner, b.files[i].owner) << a.files[i].path;
    EXPECT_EQ(a.files[i].group, b.files[i].group) << a.files[i].path;
    EXPECT_EQ(a.files[i].content, b.files[i].content) << a.files[i].path;
  }
}

TEST(ValidateVarsPath, Table) {
  struct Case {
    std::string path;
    std::string want;  // "" = valid
  } cases[] = {
      {"key.txt", ""},
      {"activation/web1/secret", ""},
      {".hidden", ""},
      {"..dots", ""},
      {"a..b/c", ""},
      {"with space/and-unicode-\xc3\xa9", ""},
      {std::string(1024, 'a'), ""},
      {"", "empty path"},
      {"/etc/shadow", "is absolute; it must be relative"},
      {"../escape", "has an empty, '.' or '..' component"},
      {"a/../../escape", "'..' component"},
      {"a/..", "'..' component"},
      {"..", "'..' component"},
      {".", "'..' component"},
      {"./a", "'..' component"},
      {"a/./b", "'..' component"},
      {"a//b", "empty"},
      {"a/", "empty"},
      {"a/b/", "empty"},
      {std::string("a\0b", 3), "NUL"},
      {std::string(1025, 'a'), "longer than 1024"},
  };
  for (const auto& c : cases) {
    Status st = ValidateVarsPath(c.path);
    if (c.want.empty()) {
      EXPECT_TRUE(st.ok()) << c.path << ": " << st.message();
    } else {
      ASSERT_FALSE(st.ok()) << c.path;
      EXPECT_THAT(st.message(), HasSubstr(c.want)) << c.path;
    }
  }
}

TEST(VarsBundle, EncodeDecodeRoundTrip) {
  VarsBundle b = testing::GoldenVarsBundle();
  b.files.push_back({"empty", 0600, "root", "root", ""});
  b.files.push_back({"binary", 0400, "root", "root", std::string("\0\x01\xfe\xff", 4)});
  auto back = DecodeVarsBundle(EncodeVarsBundle(b));
  ASSERT_TRUE(back.ok()) << back.message();
  ExpectSame(*back, b);
}

TEST(VarsBundle, DefaultsModeOwnerGroup) {
  auto r = DecodeVarsBundle(R"({"format":1,"files":[{"path":"key.txt","content":"eA=="}]})");
  ASSERT_TRUE(r.ok()) << r.message();
  ASSERT_EQ(r->files.size(), 1u);
  EXPECT_EQ(r->files[0].mode, 0400u);
  EXPECT_EQ(r->files[0].owner, "root");
  EXPECT_EQ(r->files[0].group, "root");
  EXPECT_EQ(r->files[0].content, "x");
  auto empty = DecodeVarsBundle(R"({"format":1,"files":[]})");
  ASSERT_TRUE(empty.ok()) << empty.message();
  EXPECT_TRUE(empty->files.empty());
}

TEST(VarsBundle, GoldenFile) {
  auto path = testing::TestData("vars_bundle.json");
  if (testing::UpdateGolden()) {
    testing::Spit(path, json::parse(EncodeVarsBundle(testing::GoldenVarsBundle())).dump(2) + "\n");
  }
  std::string text = testing::Slurp(path);
  auto b = DecodeVarsBundle(text);
  ASSERT_TRUE(b.ok()) << b.message();
  EXPECT_EQ(json::parse(EncodeVarsBundle(*b)), json::parse(text));
  ExpectSame(*b, testing::GoldenVarsBundle());
}

std::string Bundle(const std::vector<json>& files) {
  return json{{"format", 1}, {"files", files}}.dump();
}
json File(const std::string& path, const std::string& mode = "0400",
          const std::string& content = "eA==") {
  return {{"path", path}, {"mode", mode}, {"content", content}};
}

TEST(VarsBundle, DecodeRefusals) {
  json owner_bad = File("a");
  owner_bad["owner"] = "root;rm";
  json group_bad = File("a");
  group_bad["group"] = "";
  json owner_long = File("a");
  owner_long["owner"] = std::string(33, 'u');
  json no_content = File("a");
  no_content.erase("content");
  json content_num = File("a");
  content_num["content"] = 5;
  struct Case {
    const char* name;
    std::string text;
    std::string want;
  } cases[] = {
      {"not json", "{", "vars bundle: malformed JSON"},
      {"not object", "[]", "format is not supported"},
      {"format 2", R"({"format":2,"files":[]})", "format is not supported"},
      {"format huge float", R"({"format":1e300,"files":[]})", "format is not supported"},
      {"format float", R"({"format":1.0,"files":[]})", "format is not supported"},
      {"format string", R"({"format":"1","files":[]})", "format is not supported"},
      {"no files", R"({"format":1})", "malformed"},
      {"files not list", R"({"format":1,"files":{}})", "'files' is not a list"},
      {"absolute", Bundle({File("/etc/shadow")}), "is absolute"},
      {"dotdot", Bundle({File("a/../../b")}), "'..' component"},
      {"dot", Bundle({File("./a")}), "'..' component"},
      {"empty component", Bundle({File("a//b")}), "empty"},
      {"empty path", Bundle({File("")}), "empty path"},
      {"duplicate", Bundle({File("a/b"), File("c"), File("a/b")}), "'a/b' appears twice"},
      {"file and dir", Bundle({File("a"), File("a/b")}), "'a' is both a file and a directory"},
      {"file and deep dir", Bundle({File("x/y/z"), File("x/y")}),
       "'x/y' is both a file and a directory"},
      {"mode not octal", Bundle({File("a", "0999")}), "invalid mode '0999'"},
      {"mode too long", Bundle({File("a", "00400")}), "invalid mode '00400'"},
      {"mode empty", Bundle({File("a", "")}), "invalid mode ''"},
      {"mode symbolic", Bundle({File("a", "u+rw")}), "invalid mode"},
      {"mode negative", Bundle({File("a", "-400")}), "invalid mode"},
      {"setuid", Bundle({File("a", "4755")}), "asks for setuid/setgid/sticky"},
      {"setgid", Bundle({File("a", "2750")}), "setuid/setgid/sticky"},
      {"sticky", Bundle({File("a", "1700")}), "setuid/setgid/sticky"},
      {"mode not string", Bundle({json{{"path", "a"}, {"mode", 256}, {"content", ""}}}),
       "malformed"},
      {"bad owner", Bundle({owner_bad}), "invalid owner or group"},
      {"empty group", Bundle({group_bad}), "invalid owner or group"},
      {"long owner", Bundle({owner_long}), "invalid owner or group"},
      {"content missing", Bundle({no_content}), "malformed"},
      {"content not string", Bundle({content_num}), "malformed"},
      {"content not base64", Bundle({File("a", "0400", "%%%")}), "content that is not base64"},
      {"path not string", Bundle({json{{"path", 7}, {"content", ""}}}), "malformed"},
      {"too deep", R"({"format":1,"files":[{"path":"a","content":"","x":[[[[[]]]]]}]})",
       "nesting deeper than 6"},
  };
  for (const auto& c : cases) {
    Result<VarsBundle> r = VarsBundle{};
    EXPECT_NO_THROW(r = DecodeVarsBundle(c.text)) << c.name;
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.name;
  }
}

TEST(VarsBundle, SizeLimits) {
  VarsLimits limits;
  limits.max_files = 3;
  limits.max_file_bytes = 10;
  limits.max_total_bytes = 25;
  auto content = [](size_t n) { return Base64Encode(std::string(n, 'c')); };
  struct Case {
    const char* name;
    std::vector<json> files;
    std::string want;  // "" = accepted
  } cases[] = {
      {"at limits",
       {File("a", "0400", content(10)), File("b", "0400", content(10)),
        File("c", "0400", content(5))},
       ""},
      {"file too large", {File("a", "0400", content(11))}, "vars file 'a' is larger than 10 bytes"},
      {"total too large",
       {File("a", "0400", content(10)), File("b", "0400", content(10)),
        File("c", "0400", content(6))},
       "vars bundle is larger than 25 bytes"},
      {"too many files",
       {File("a"), File("b"), File("c"), File("d")},
       "vars bundle has 4 files; the limit is 3"},
  };
  for (const auto& c : cases) {
    auto r = DecodeVarsBundle(Bundle(c.files), limits);
    if (c.want.empty()) {
      EXPECT_TRUE(r.ok()) << c.name << ": " << r.message();
    } else {
      ASSERT_FALSE(r.ok()) << c.name;
      EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.name;
    }
  }
  // The text itself is bounded before parsing (twice the total plus slack).
  std::string huge = Bundle({File("a", "0400", std::string(2 * 25 + 65536, 'A'))});
  auto r = DecodeVarsBundle(huge, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("exceeds the limit"));
}

TEST(ReadVarsDirectory, ReadsTreeKeepingModes) {
  testing::TempDir dir;
  fs::create_directories(dir / "activation/web1");
  testing::Spit(dir / "key.txt", "age-key");
  testing::Spit(dir / "activation/web1/secret", "s3cret");
  testing::Spit(dir / "activation/web1/public", "pub");
  ASSERT_EQ(::chmod((dir / "key.txt").c_str(), 0400), 0);
  ASSERT_EQ(::chmod((dir / "activation/web1/secret").c_str(), 0640), 0);
  ASSERT_EQ(::chmod((dir / "activation/web1/public").c_str(), 0644), 0);
  auto b = ReadVarsDirectory(dir.path());
  ASSERT_TRUE(b.ok()) << b.message();
  VarsBundle want;
  want.files = {{"activation/web1/public", 0644, "root", "root", "pub"},
                {"activation/web1/secret", 0640, "root", "root", "s3cret"},
                {"key.txt", 0400, "root", "root", "age-key"}};
  ExpectSame(*b, want);
  // What is read can be encoded and decoded again unchanged.
  auto again = DecodeVarsBundle(EncodeVarsBundle(*b));
  ASSERT_TRUE(again.ok()) << again.message();
  ExpectSame(*again, want);
}

TEST(ReadVarsDirectory, Refusals) {
  struct Case {
    const char* name;
    std::function<void(const fs::path&)> setup;
    VarsLimits limits;
    std::string want;
  } cases[] = {
      {"symlink to file",
       [](const fs::path& d) {
         testing::Spit(d / "real", "x");
         ASSERT_EQ(::symlink("real", (d / "link").c_str()), 0);
       },
       {},
       "vars entry link is a symlink; links are refused"},
      {"symlink to directory",
       [](const fs::path& d) {
         fs::create_directory(d / "sub");
         ASSERT_EQ(::symlink("/etc", (d / "sub/etc").c_str()), 0);
       },
       {},
       "vars entry sub/etc is a symlink"},
      {"fifo",
       [](const fs::path& d) { ASSERT_EQ(::mkfifo((d / "pipe").c_str(), 0600), 0); },
       {},
       "vars entry pipe is not a regular file"},
      {"file too large",
       [](const fs::path& d) { testing::Spit(d / "big", std::string(11, 'b')); },
       {3, 10, 100},
       "larger than 10 bytes"},
      {"total too large",
       [](const fs::path& d) {
         testing::Spit(d / "a", std::string(8, 'a'));
         testing::Spit(d / "b", std::string(8, 'b'));
       },
       {3, 10, 15},
       "vars directory is too large"},
      {"too many files",
       [](const fs::path& d) {
         for (const char* n : {"a", "b", "c", "d"}) testing::Spit(d / n, "x");
       },
       {3, 10, 100},
       "too many files"},
  };
  for (const auto& c : cases) {
    testing::TempDir dir;
    c.setup(dir.path());
    auto r = ReadVarsDirectory(dir.path(), c.limits);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.want)) << c.name;
  }
  testing::TempDir dir;
  auto missing = ReadVarsDirectory(dir / "nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.message(), HasSubstr("does not exist"));
}

TEST(VarsBundleTarget, RoundTripsAndIsChecked) {
  VarsBundle b;
  b.files.push_back({"key.txt", 0400, "root", "root", "AGE-SECRET-KEY-1"});
  EXPECT_EQ(EncodeVarsBundle(b).find("target"), std::string::npos) << "absent unless set";
  b.target = "/var/lib/sops-nix";
  auto back = DecodeVarsBundle(EncodeVarsBundle(b));
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_EQ(back->target, "/var/lib/sops-nix");
  for (const char* bad : {"relative", "/", "/a/../b", "/a/.."}) {
    b.target = bad;
    EXPECT_FALSE(DecodeVarsBundle(EncodeVarsBundle(b)).ok()) << bad;
  }
}

}  // namespace
}  // namespace muster
