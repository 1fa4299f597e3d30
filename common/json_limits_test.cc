#include "common/json_limits.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace muster {
namespace {

using ::testing::HasSubstr;

std::string Nest(int depth) {
  return std::string(static_cast<size_t>(depth), '[') +
         std::string(static_cast<size_t>(depth), ']');
}

TEST(CheckJsonLimits, Table) {
  struct Case {
    const char* name;
    std::string text;
    std::size_t max_bytes;
    int max_depth;
    std::string want_error;  // "" = accepted
  } cases[] = {
      {"empty", "", 10, 1, ""},
      {"flat object", R"({"a":1})", 100, 1, ""},
      {"at size limit", "12345", 5, 1, ""},
      {"over size limit", "123456", 5, 1, "message of 6 bytes exceeds the limit of 5 bytes"},
      {"at depth limit", Nest(3), 100, 3, ""},
      {"over depth limit", Nest(4), 100, 3, "JSON nesting deeper than 3 levels"},
      {"mixed brackets", R"({"a":[{"b":[]}]})", 100, 4, ""},
      {"mixed brackets too deep", R"({"a":[{"b":[]}]})", 100, 3, "deeper than 3"},
      {"siblings do not add up", "[[],[],[],[]]", 100, 2, ""},
      {"brackets inside a string", R"(["[[[[{{{{"])", 100, 1, ""},
      {"braces inside a key", R"({"{{{{": "}}}}"})", 100, 1, ""},
      {"escaped quote keeps string open", R"(["\"[[[["])", 100, 1, ""},
      {"closing before opening", "]]]][[[[", 100, 10, "unbalanced brackets"},
      {"escaped backslash closes string", R"(["\\", [[ ]]])", 100, 2, "deeper than 2"},
      {"unicode escape", R"(["\u005b[["])", 100, 1, ""},
      {"deep after string", R"(["]]]]", [[[]]]])", 100, 3, "deeper than 3"},
  };
  for (const auto& c : cases) {
    Status st = CheckJsonLimits(c.text, c.max_bytes, c.max_depth);
    if (c.want_error.empty()) {
      EXPECT_TRUE(st.ok()) << c.name << ": " << st.message();
    } else {
      ASSERT_FALSE(st.ok()) << c.name;
      EXPECT_THAT(st.message(), HasSubstr(c.want_error)) << c.name;
    }
  }
}

TEST(CheckJsonLimits, DefaultsAllowOneMebibyteAnd32Levels) {
  EXPECT_TRUE(CheckJsonLimits(Nest(32)).ok());
  EXPECT_FALSE(CheckJsonLimits(Nest(33)).ok());
  std::string big = "\"" + std::string(kDefaultMaxMessageBytes - 2, 'x') + "\"";
  EXPECT_TRUE(CheckJsonLimits(big).ok());
  EXPECT_FALSE(CheckJsonLimits(big + " ").ok());
}

TEST(ParseJsonBounded, ParsesOrExplains) {
  auto ok = ParseJsonBounded(R"({"a":[1,2,{"b":"c"}]})");
  ASSERT_TRUE(ok.ok()) << ok.message();
  EXPECT_EQ((*ok)["a"][2]["b"], "c");

  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"", "malformed JSON"},
      {"{", "malformed JSON"},
      {R"({"a":1,})", "malformed JSON"},
      {"nul\x01l", "malformed JSON"},
      {Nest(40), "nesting deeper than 32"},
      {std::string(kDefaultMaxMessageBytes + 1, ' '), "exceeds the limit"},
  };
  for (const auto& c : cases) {
    Result<nlohmann::json> r = nlohmann::json();
    EXPECT_NO_THROW(r = ParseJsonBounded(c.text));
    ASSERT_FALSE(r.ok()) << c.text.substr(0, 40);
    EXPECT_THAT(r.message(), HasSubstr(c.want));
  }
}

}  // namespace
}  // namespace muster
