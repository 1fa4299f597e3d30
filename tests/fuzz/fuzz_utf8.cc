// The UTF-8 helpers on arbitrary bytes. The first two bytes choose a byte
// limit, the rest is the string. Checked beyond "no crash":
//   - IsValidUtf8 agrees with nlohmann's own strict encoder (an independent
//     implementation): valid exactly when json::dump() does not throw;
//   - SanitizeUtf8 output is always valid, and equal to the input when it was;
//   - CutUtf8 output is valid, at most the limit, a prefix of the sanitised
//     input, and the next character would not have fitted;
//   - TailUtf8 output is valid, at most the limit and a suffix of it;
//   - Utf8SplitPoint stays within 3 bytes below the limit and never splits a
//     character of a valid input;
//   - DumpJson never throws and always writes valid UTF-8.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/json_limits.h"
#include "common/utf8.h"

namespace {
[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "invariant broken: %s\n", what);
  std::abort();
}
std::size_t CharLen(unsigned char b) { return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4; }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace muster;
  if (size < 2) return 0;
  std::size_t max = static_cast<std::size_t>(data[0]) << 8 | data[1];
  std::string_view in(reinterpret_cast<const char*>(data + 2), size - 2);

  bool valid = IsValidUtf8(in);
  bool dump_ok = true;
  try {
    (void)nlohmann::json(std::string(in)).dump();
  } catch (const nlohmann::json::type_error&) {
    dump_ok = false;
  }
  if (valid != dump_ok) Fail("IsValidUtf8 disagrees with json::dump()");

  std::string clean = SanitizeUtf8(in);
  if (!IsValidUtf8(clean)) Fail("SanitizeUtf8 output is not valid");
  if (valid && clean != in) Fail("SanitizeUtf8 changed a valid string");
  if (!valid && clean == in) Fail("SanitizeUtf8 left an invalid string unchanged");

  std::string cut = CutUtf8(in, max);
  if (!IsValidUtf8(cut)) Fail("CutUtf8 output is not valid");
  if (cut.size() > max) Fail("CutUtf8 output is longer than the limit");
  if (clean.compare(0, cut.size(), cut) != 0) Fail("CutUtf8 output is not a prefix");
  if (cut.size() < clean.size() &&
      cut.size() + CharLen(static_cast<unsigned char>(clean[cut.size()])) <= max) {
    Fail("CutUtf8 stopped before a character that fits");
  }

  std::string tail = TailUtf8(in, max);
  if (!IsValidUtf8(tail)) Fail("TailUtf8 output is not valid");
  if (tail.size() > max) Fail("TailUtf8 output is longer than the limit");
  if (tail.size() > clean.size() ||
      clean.compare(clean.size() - tail.size(), tail.size(), tail) != 0) {
    Fail("TailUtf8 output is not a suffix");
  }

  std::size_t split = Utf8SplitPoint(in, max);
  if (in.size() <= max ? split != in.size() : (split > max || split + 3 < max)) {
    Fail("Utf8SplitPoint is out of range");
  }
  if (valid && (!IsValidUtf8(in.substr(0, split)) || !IsValidUtf8(in.substr(split)))) {
    Fail("Utf8SplitPoint split a character");
  }

  std::string dumped = DumpJson(nlohmann::json{{"s", std::string(in)}});
  if (!IsValidUtf8(dumped)) Fail("DumpJson output is not valid");
  return 0;
}
