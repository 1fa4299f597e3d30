#include "controller/pg_result.h"

#include <gtest/gtest.h>

namespace muster {
namespace {

TEST(PgTextArray, QuotesEachValueAndEscapesOnlyWhatTheArraySyntaxNeeds) {
  EXPECT_EQ(pg::TextArray({}), "{}");
  EXPECT_EQ(pg::TextArray({""}), "{\"\"}");
  EXPECT_EQ(pg::TextArray({"a", "b c"}), "{\"a\",\"b c\"}");
  EXPECT_EQ(pg::TextArray({"say \"hi\"", "back\\slash", "\\\"", "{,}"}),
            "{\"say \\\"hi\\\"\",\"back\\\\slash\",\"\\\\\\\"\",\"{,}\"}");
  // A NUL, anywhere in a value, becomes U+FFFD.
  EXPECT_EQ(pg::TextArray({std::string("\0a\0", 3)}),
            "{\"\xEF\xBF\xBD"
            "a\xEF\xBF\xBD\"}");
  // A long run between escapes is kept whole.
  std::string manifest = "{\"machine\":\"" + std::string(5000, 'x') + "\"}";
  std::string expected = "{\"{\\\"machine\\\":\\\"" + std::string(5000, 'x') + "\\\"}\"}";
  EXPECT_EQ(pg::TextArray({manifest}), expected);
}

}  // namespace
}  // namespace muster
