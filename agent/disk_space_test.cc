#include "agent/disk_space.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

TEST(DiskSpace, ParsesNixDryRunReports) {
  struct Case {
    const char* text;
    bool known;
    std::int64_t paths, download, unpacked;
  } cases[] = {
      // nix 2.3–2.18
      {"these 3 paths will be fetched (1.50 MiB download, 4.00 MiB unpacked):\n"
       "  /nix/store/aaaa-a\n",
       true, 3, 1572864, 4194304},
      {"this path will be fetched (0.01 MiB download, 0.03 MiB unpacked):\n  /nix/store/b\n", true,
       1, 10486, 31457},
      // newer nix renders sizes with their own unit
      {"warning: x\nthese 12 paths will be fetched (12.3 KiB download, 1.2 GiB unpacked):\n", true,
       12, 12595, 1288490189},
      {"these 2 paths will be fetched (10 B download, 20 B unpacked):", true, 2, 10, 20},
      // nothing to fetch, or something else entirely
      {"", false, 0, 0, 0},
      {"don't know how to build these paths:\n  /nix/store/x\n", false, 0, 0, 0},
      {"these 3 paths will be fetched (lots download, more unpacked):", false, 0, 0, 0},
  };
  for (const auto& c : cases) {
    auto e = ParseDryRunFetch(c.text);
    EXPECT_EQ(e.known, c.known) << c.text;
    EXPECT_EQ(e.paths, c.paths) << c.text;
    EXPECT_EQ(e.download_bytes, c.download) << c.text;
    EXPECT_EQ(e.unpacked_bytes, c.unpacked) << c.text;
  }
}

TEST(DiskSpace, CheckRoomSaysWhatIsMissing) {
  const std::int64_t mib = 1 << 20;
  EXPECT_TRUE(CheckRoom("gen 3", "/nix/store", 100 * mib, 50 * mib, 50 * mib, "x").ok());
  auto st = CheckRoom("generation 3 of web1", "/nix/store", 100 * mib, 60 * mib, 50 * mib,
                      "collect garbage");
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("not enough free space in /nix/store for generation 3 of web1"),
            std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("needs 60.0 MiB, 100.0 MiB are free and 50.0 MiB must stay free"),
            std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("nothing was changed. collect garbage"), std::string::npos);
  EXPECT_FALSE(CheckRoom("g", "/boot", 10, 11, 0, "x").ok());
}

TEST(DiskSpace, FreeBytesOfARealDirectoryAndAMissingOne) {
  auto f = FreeBytes("/");
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_GT(*f, 0);
  auto missing = FreeBytes("/nonexistent/muster-test");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("/nonexistent/muster-test"), std::string::npos);
}

}  // namespace
}  // namespace muster
