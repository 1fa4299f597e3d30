#include "common/utf8.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/json_limits.h"

namespace muster {
namespace {

// U+FFFD as a literal piece; literals are kept apart so that no \x escape
// swallows a following hex digit.
#define FFFD "\xEF\xBF\xBD"

std::string Hex(std::string_view s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += d[c >> 4];
    out += d[c & 15];
    out += ' ';
  }
  return out;
}

struct Case {
  const char* what;
  std::string in;
  bool valid;
  std::string sanitized;  // expected SanitizeUtf8(in)
};

// Well-formed and ill-formed inputs with their maximal-subpart repairs.
const std::vector<Case>& Cases() {
  static const std::vector<Case> cases = {
      {"empty", "", true, ""},
      {"ascii", "hello, world", true, "hello, world"},
      {"NUL is a character", std::string("a\0b", 3), true, std::string("a\0b", 3)},
      {"2-byte U+00E9", "caf\xC3\xA9", true, "caf\xC3\xA9"},
      {"2-byte lowest U+0080", "\xC2\x80", true, "\xC2\x80"},
      {"3-byte U+20AC", "\xE2\x82\xAC", true, "\xE2\x82\xAC"},
      {"3-byte lowest U+0800", "\xE0\xA0\x80", true, "\xE0\xA0\x80"},
      {"3-byte U+D7FF below surrogates", "\xED\x9F\xBF", true, "\xED\x9F\xBF"},
      {"3-byte U+E000 above surrogates", "\xEE\x80\x80", true, "\xEE\x80\x80"},
      {"3-byte U+FFFD itself", FFFD, true, FFFD},
      {"4-byte U+1F600", "\xF0\x9F\x98\x80", true, "\xF0\x9F\x98\x80"},
      {"4-byte lowest U+10000", "\xF0\x90\x80\x80", true, "\xF0\x90\x80\x80"},
      {"4-byte highest U+10FFFF", "\xF4\x8F\xBF\xBF", true, "\xF4\x8F\xBF\xBF"},
      {"mixed widths",
       "a\xC3\xA9"
       "b\xE2\x82\xAC"
       "c\xF0\x9F\x98\x80"
       "d",
       true,
       "a\xC3\xA9"
       "b\xE2\x82\xAC"
       "c\xF0\x9F\x98\x80"
       "d"},
      {"lone continuation",
       "a\x80"
       "b",
       false, "a" FFFD "b"},
      {"two continuations", "\x80\xBF", false, FFFD FFFD},
      {"overlong 2-byte C0 AF ('/')", "\xC0\xAF", false, FFFD FFFD},
      {"overlong 2-byte C1 BF", "\xC1\xBF", false, FFFD FFFD},
      {"overlong 3-byte E0 80 AF", "\xE0\x80\xAF", false, FFFD FFFD FFFD},
      {"overlong 3-byte E0 9F BF", "\xE0\x9F\xBF", false, FFFD FFFD FFFD},
      {"overlong 4-byte F0 80 80 AF", "\xF0\x80\x80\xAF", false, FFFD FFFD FFFD FFFD},
      {"overlong 4-byte F0 8F BF BF", "\xF0\x8F\xBF\xBF", false, FFFD FFFD FFFD FFFD},
      {"surrogate U+D800", "\xED\xA0\x80", false, FFFD FFFD FFFD},
      {"surrogate U+DFFF", "\xED\xBF\xBF", false, FFFD FFFD FFFD},
      {"surrogate pair as CESU-8", "\xED\xA0\xBD\xED\xB8\x80", false,
       FFFD FFFD FFFD FFFD FFFD FFFD},
      {"above U+10FFFF: F4 90 80 80", "\xF4\x90\x80\x80", false, FFFD FFFD FFFD FFFD},
      {"above U+10FFFF: F5", "\xF5\x80\x80\x80", false, FFFD FFFD FFFD FFFD},
      {"FE and FF", "\xFE\xFF", false, FFFD FFFD},
      {"truncated 2-byte at end", "ab\xC3", false, "ab" FFFD},
      {"truncated 3-byte at end", "ab\xE2\x82", false, "ab" FFFD},
      {"truncated 4-byte at end (3 of 4)", "ab\xF0\x9F\x98", false, "ab" FFFD},
      {"truncated 4-byte at end (1 of 4)", "ab\xF0", false, "ab" FFFD},
      {"truncated 3-byte before ASCII",
       "\xE2\x82"
       "x",
       false, FFFD "x"},
      {"truncated 4-byte before a valid char", "\xF0\x9F\xC3\xA9", false, FFFD "\xC3\xA9"},
      // Unicode 15, Table 3-8 (U+FFFD for maximal subparts).
      {"Unicode table 3-8", "\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64", false,
       "a" FFFD FFFD FFFD "b" FFFD "c" FFFD FFFD "d"},
      {"everything mixed",
       "ok \xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80 \xC0\xAF\xED\xA0\x80\xF4\x90\x80\x80 "
       "\xE2\x82\xF0\x9F\x98\x80\x80 end\xF0\x9F",
       false,
       "ok \xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80 " FFFD FFFD FFFD FFFD FFFD FFFD FFFD FFFD FFFD
       " " FFFD "\xF0\x9F\x98\x80" FFFD " end" FFFD},
  };
  return cases;
}

// Length of the character starting at s[i] in well-formed s.
std::size_t CharLen(std::string_view s, std::size_t i) {
  auto b = static_cast<unsigned char>(s[i]);
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

TEST(Utf8, ValidityAndRepairTable) {
  for (const auto& c : Cases()) {
    SCOPED_TRACE(std::string(c.what) + ": " + Hex(c.in));
    EXPECT_EQ(IsValidUtf8(c.in), c.valid);
    std::string s = SanitizeUtf8(c.in);
    EXPECT_EQ(Hex(s), Hex(c.sanitized));
    EXPECT_TRUE(IsValidUtf8(s));
    EXPECT_EQ(SanitizeUtf8(s), s) << "sanitising is idempotent";
  }
}

TEST(Utf8, CutAtEveryPointIsTheLongestWellFormedPrefix) {
  for (const auto& c : Cases()) {
    const std::string clean = SanitizeUtf8(c.in);
    for (std::size_t max = 0; max <= c.in.size() + 4; ++max) {
      SCOPED_TRACE(std::string(c.what) + " cut at " + std::to_string(max) + ": " + Hex(c.in));
      std::string cut = CutUtf8(c.in, max);
      EXPECT_TRUE(IsValidUtf8(cut)) << Hex(cut);
      EXPECT_LE(cut.size(), max);
      ASSERT_EQ(clean.compare(0, cut.size(), cut), 0) << "a prefix of the sanitised input";
      if (cut.size() < clean.size()) {
        EXPECT_GT(cut.size() + CharLen(clean, cut.size()), max)
            << "the next character would have fitted";
      }
    }
  }
}

TEST(Utf8, TailAtEveryPointIsTheLongestWellFormedSuffix) {
  for (const auto& c : Cases()) {
    const std::string clean = SanitizeUtf8(c.in);
    for (std::size_t max = 0; max <= c.in.size() + 4; ++max) {
      SCOPED_TRACE(std::string(c.what) + " tail of " + std::to_string(max) + ": " + Hex(c.in));
      std::string tail = TailUtf8(c.in, max);
      EXPECT_TRUE(IsValidUtf8(tail)) << Hex(tail);
      EXPECT_LE(tail.size(), max);
      ASSERT_GE(clean.size(), tail.size());
      std::size_t start = clean.size() - tail.size();
      ASSERT_EQ(clean.compare(start, tail.size(), tail), 0) << "a suffix of the sanitised input";
      if (start > 0) {
        std::size_t prev = start - 1;  // the character before the tail
        while (prev > 0 && (static_cast<unsigned char>(clean[prev]) & 0xC0) == 0x80) --prev;
        EXPECT_GT(clean.size() - prev, max) << "the previous character would have fitted";
      }
    }
  }
}

TEST(Utf8, SplitPointNeverBreaksAWellFormedCharacter) {
  for (const auto& c : Cases()) {
    for (std::size_t max = 0; max <= c.in.size() + 4; ++max) {
      SCOPED_TRACE(std::string(c.what) + " split at " + std::to_string(max) + ": " + Hex(c.in));
      std::size_t n = Utf8SplitPoint(c.in, max);
      if (max >= c.in.size()) {
        EXPECT_EQ(n, c.in.size());
      } else {
        EXPECT_LE(n, max);
        EXPECT_GE(n + 3, max);
      }
      if (max >= 4 && !c.in.empty()) {
        EXPECT_GT(n, 0u);
      }
      // Valid characters are never split: both pieces of a well-formed input
      // are well-formed.
      if (c.valid) {
        EXPECT_TRUE(IsValidUtf8(c.in.substr(0, n)));
        EXPECT_TRUE(IsValidUtf8(c.in.substr(n)));
      }
    }
  }
}

TEST(Utf8, LongMultiByteStringsCutAroundALimit) {
  // The shape of the controller's cut limits: repeated 2-, 3- and 4-byte
  // characters, offset by 0..3 ASCII bytes, cut at every point near 4096.
  for (std::string ch : {"\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80"}) {
    for (std::size_t pad = 0; pad < 4; ++pad) {
      std::string s(pad, 'x');
      while (s.size() < 4200) s += ch;
      for (std::size_t max = 4090; max <= 4100; ++max) {
        std::string cut = CutUtf8(s, max);
        ASSERT_TRUE(IsValidUtf8(cut)) << "char " << Hex(ch) << " pad " << pad << " max " << max;
        ASSERT_LE(cut.size(), max);
        ASSERT_GT(cut.size() + ch.size(), max);
        ASSERT_EQ(s.compare(0, cut.size(), cut), 0);
      }
    }
  }
}

TEST(DumpJson, ReplacesWhatDumpWouldThrowOn) {
  nlohmann::json j = {{"detail", std::string("cut \xE2\x82")}, {"ok", "caf\xC3\xA9"}};
  EXPECT_THROW((void)j.dump(), nlohmann::json::type_error);
  std::string text;
  ASSERT_NO_THROW(text = DumpJson(j));
  EXPECT_TRUE(IsValidUtf8(text));
  auto back = nlohmann::json::parse(text);
  EXPECT_EQ(back["detail"].get<std::string>().rfind("cut " FFFD, 0), 0u);
  EXPECT_EQ(back["ok"], "caf\xC3\xA9");
  EXPECT_EQ(DumpJson(back), back.dump()) << "well-formed data is dumped exactly as dump() does";
}

#undef FFFD

TEST(PrintableUtf8, ControlsAndEscapesCannotReachATerminalOrALog) {
  struct PrintCase {
    std::string in, want;
  } cases[] = {
      {"plain", "plain"},
      {"a\tb", "a\tb"},
      {"line\nforged 2026-01-01 info operator removed",
       "line\\x0aforged 2026-01-01 info operator removed"},
      {"\x1b[2J\x1b[31m", "\\x1b[2J\\x1b[31m"},
      {"\r\x7f", "\\x0d\\x7f"},
      {"\xc2\x9b"
       "1m",
       "\\x9b1m"},  // C1 CSI
      {"caf\xc3\xa9 \xe2\x82\xac", "caf\xc3\xa9 \xe2\x82\xac"},
      {"bad\xff", "bad\xef\xbf\xbd"},
      {std::string("nul\0", 4), "nul\\x00"},
  };
  for (const auto& c : cases) EXPECT_EQ(PrintableUtf8(c.in), c.want) << c.in;
}

TEST(ForLog, CutsBetweenCharactersAndMarksTheCut) {
  EXPECT_EQ(ForLog("short"), "short");
  std::string euros;
  for (int i = 0; i < 100; ++i) euros += "\xe2\x82\xac";
  std::string s = ForLog(euros, 10);
  EXPECT_EQ(s, "\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\xe2\x80\xa6");
  EXPECT_TRUE(IsValidUtf8(s));
  EXPECT_EQ(ForLog("a\nb", 10), "a\\x0ab");
}

}  // namespace
}  // namespace muster
