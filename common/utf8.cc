#include "common/utf8.h"

#include <algorithm>

namespace muster {

namespace {

struct Seq {
  std::size_t len;  // bytes consumed: the whole character, or the maximal subpart
  bool valid;
};

// The sequence starting at s[i] (i < s.size()), per Unicode Table 3-7.
Seq Next(std::string_view s, std::size_t i) {
  auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return {1, true};
  std::size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    need = 3;
    if (b == 0xE0) lo = 0xA0;  // overlong below U+0800
    if (b == 0xED) hi = 0x9F;  // surrogates U+D800..U+DFFF
  } else if (b >= 0xF0 && b <= 0xF4) {
    need = 4;
    if (b == 0xF0) lo = 0x90;  // overlong below U+10000
    if (b == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return {1, false};  // continuation byte, C0/C1 (overlong) or F5..FF
  }
  for (std::size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return {k, false};  // truncated
    auto c = static_cast<unsigned char>(s[i + k]);
    bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) return {k, false};
  }
  return {need, true};
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    // Fast path over ASCII.
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    Seq q = Next(s, i);
    if (!q.valid) return false;
    i += q.len;
  }
  return true;
}

std::string SanitizeUtf8(std::string_view s) {
  if (IsValidUtf8(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (std::size_t i = 0; i < s.size();) {
    Seq q = Next(s, i);
    if (q.valid) {
      out.append(s.substr(i, q.len));
    } else {
      out.append(kUtf8Replacement);
    }
    i += q.len;
  }
  return out;
}

std::string CutUtf8(std::string_view s, std::size_t max_bytes) {
  std::string out;
  out.reserve(std::min(s.size(), max_bytes));
  for (std::size_t i = 0; i < s.size();) {
    Seq q = Next(s, i);
    std::string_view piece = q.valid ? s.substr(i, q.len) : kUtf8Replacement;
    if (out.size() + piece.size() > max_bytes) break;
    out.append(piece);
    i += q.len;
  }
  return out;
}

std::string TailUtf8(std::string_view s, std::size_t max_bytes) {
  std::string clean = SanitizeUtf8(s);
  if (clean.size() <= max_bytes) return clean;
  std::size_t start = clean.size() - max_bytes;
  // clean is well-formed: a character starts at every byte that is not 10xxxxxx.
  while (start < clean.size() && (static_cast<unsigned char>(clean[start]) & 0xC0) == 0x80) {
    ++start;
  }
  return clean.substr(start);
}

std::size_t Utf8SplitPoint(std::string_view s, std::size_t max_bytes) {
  if (s.size() <= max_bytes) return s.size();
  // Look back (at most 3 bytes) for the lead byte of a character that would
  // straddle max_bytes.
  for (std::size_t back = 1; back <= 3 && back <= max_bytes; ++back) {
    std::size_t start = max_bytes - back;
    auto b = static_cast<unsigned char>(s[start]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: keep looking
    Seq q = Next(s, start);
    return q.valid && start + q.len > max_bytes ? start : max_bytes;
  }
  return max_bytes;
}

std::string PrintableUtf8(std::string_view in) {
  static constexpr char kHex[] = "0123456789abcdef";
  const std::string clean = SanitizeUtf8(in);
  std::string out;
  out.reserve(clean.size());
  auto escape = [&](unsigned char c) {
    out += "\\x";
    out += kHex[c >> 4];
    out += kHex[c & 15];
  };
  for (std::size_t i = 0; i < clean.size(); ++i) {
    auto c = static_cast<unsigned char>(clean[i]);
    if ((c < 0x20 && c != '\t') || c == 0x7f) {
      escape(c);
    } else if (c == 0xc2 && i + 1 < clean.size() &&
               static_cast<unsigned char>(clean[i + 1]) < 0xa0) {
      escape(static_cast<unsigned char>(clean[++i]));  // C1 control, U+0080..U+009F
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string ForLog(std::string_view s, std::size_t max_bytes) {
  if (s.size() <= max_bytes) return PrintableUtf8(s);
  return PrintableUtf8(CutUtf8(s, max_bytes)) + "\xe2\x80\xa6";
}

}  // namespace muster
