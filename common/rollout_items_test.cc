#include "common/rollout_items.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace muster {
namespace {

using ::testing::HasSubstr;

const std::string kSig(64, 's');

TEST(RolloutItems, GoldenBytes) {
  std::string out;
  AppendRolloutItem(out, "{\"m\":1}", kSig, std::string("\x00\xff", 2));
  AppendRolloutItem(out, "{}", kSig, "");
  const std::string want = std::string("\0\0\0\x07", 4) + "{\"m\":1}" + kSig +
                           std::string("\0\0\0\x02\x00\xff", 6) + std::string("\0\0\0\x02", 4) +
                           "{}" + kSig + std::string("\0\0\0\0", 4);
  EXPECT_EQ(out, want);
}

TEST(RolloutItems, RoundTrip) {
  std::string out;
  for (int i = 0; i < 3; ++i) {
    AppendRolloutItem(out, "manifest-" + std::to_string(i), kSig,
                      i == 1 ? "" : std::string(100 * i + 1, static_cast<char>(i)));
  }
  auto items = DecodeRolloutItems(out, 3, 1000);
  ASSERT_TRUE(items) << items.message();
  ASSERT_EQ(items->size(), 3u);
  EXPECT_EQ((*items)[0].manifest, "manifest-0");
  EXPECT_EQ((*items)[0].vars, std::string(1, '\0'));
  EXPECT_EQ((*items)[1].vars, "");
  EXPECT_EQ((*items)[2].manifest, "manifest-2");
  EXPECT_EQ((*items)[2].signature, kSig);
  EXPECT_EQ((*items)[2].vars.size(), 201u);
}

TEST(RolloutItems, EveryTruncationIsRefused) {
  std::string out;
  AppendRolloutItem(out, "{\"a\":1}", kSig, "sealed");
  AppendRolloutItem(out, "{\"b\":2}", kSig, "sealed");
  for (std::size_t n = 0; n < out.size(); ++n) {
    auto items = DecodeRolloutItems(std::string_view(out).substr(0, n), 2, 1000);
    EXPECT_FALSE(items) << "accepted " << n << " of " << out.size() << " bytes";
  }
  auto cut = DecodeRolloutItems(std::string_view(out).substr(0, out.size() - 1), 2, 1000);
  EXPECT_THAT(cut.message(), HasSubstr("item 2 of 2 is truncated"));
}

TEST(RolloutItems, CountMustMatch) {
  std::string out;
  AppendRolloutItem(out, "{}", kSig, "");
  AppendRolloutItem(out, "{}", kSig, "");
  EXPECT_THAT(DecodeRolloutItems(out, 1, 10).message(), HasSubstr("bytes after its 1 items"));
  EXPECT_FALSE(DecodeRolloutItems(out, 3, 10));
  EXPECT_THAT(DecodeRolloutItems(out, 0, 10).message(), HasSubstr("1 to 100000 items"));
  EXPECT_FALSE(DecodeRolloutItems(out, kMaxRolloutItems + 1, 10));
}

TEST(RolloutItems, OversizedPartsAreRefused) {
  std::string big;
  AppendRolloutItem(big, std::string(kMaxRolloutManifestBytes + 1, 'x'), kSig, "");
  EXPECT_THAT(DecodeRolloutItems(big, 1, 10).message(), HasSubstr("has a manifest of 65537"));
  std::string vars;
  AppendRolloutItem(vars, "{}", kSig, std::string(11, 'v'));
  EXPECT_THAT(DecodeRolloutItems(vars, 1, 10).message(), HasSubstr("11 bytes of sealed vars"));
  EXPECT_TRUE(DecodeRolloutItems(vars, 1, 11));
  std::string empty;
  AppendRolloutItem(empty, "", kSig, "");
  EXPECT_THAT(DecodeRolloutItems(empty, 1, 10).message(), HasSubstr("manifest of 0 bytes"));
}

TEST(RolloutItems, LengthsNearTheLimitDoNotWrap) {
  // A vars length of 0xffffffff after a valid start must be refused, not wrap.
  std::string out = std::string("\0\0\0\x02", 4) + "{}" + kSig + std::string("\xff\xff\xff\xff", 4);
  EXPECT_FALSE(DecodeRolloutItems(out, 1, ~std::size_t{0}));
  std::string m = std::string("\xff\xff\xff\xff", 4) + kSig + "pad";
  EXPECT_FALSE(DecodeRolloutItems(m, 1, 10));
}

}  // namespace
}  // namespace muster
