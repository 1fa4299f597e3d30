// UTF-8 for strings that came from outside (a peer, a process, a file).
//
// Such strings are bytes, not text: before one is stored, encoded as JSON or
// cut to a byte limit it goes through these functions, so that no ill-formed
// sequence ever reaches a json::dump() (which throws on one). Well-formed means
// RFC 3629: no overlong forms, no surrogates (U+D800..U+DFFF), nothing above
// U+10FFFF. Repair follows the Unicode "maximal subpart" practice (Unicode
// §3.9, also the WHATWG decoder): each maximal prefix of a would-be sequence
// becomes one U+FFFD. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace muster {

// The replacement character U+FFFD, encoded (3 bytes).
inline constexpr std::string_view kUtf8Replacement = "\xEF\xBF\xBD";

// True if s is well-formed UTF-8 (the empty string is).
bool IsValidUtf8(std::string_view s);

// s with every ill-formed subsequence replaced by U+FFFD; s itself when it is
// well-formed. The result is always well-formed.
std::string SanitizeUtf8(std::string_view s);

// The longest prefix of SanitizeUtf8(s) that is at most max_bytes long: cut
// only between characters, so the result is always well-formed. Costs one
// pass over at most the first max_bytes + 4 bytes of s.
std::string CutUtf8(std::string_view s, std::size_t max_bytes);

// The longest suffix of SanitizeUtf8(s) that is at most max_bytes long (for
// the tail of an output stream): cut only between characters.
std::string TailUtf8(std::string_view s, std::size_t max_bytes);

// The largest n <= max_bytes such that s.substr(0, n) does not end inside a
// well-formed multi-byte character of s (for splitting raw bytes that are
// sanitised later, piece by piece). Returns s.size() when that fits; may
// return less than max_bytes by up to 3 bytes, never 0 when max_bytes >= 4.
std::size_t Utf8SplitPoint(std::string_view s, std::size_t max_bytes);

// SanitizeUtf8(s) with control characters (C0 but tab, DEL, C1) shown as
// \xNN, so that text from a peer cannot move a terminal's cursor, change its
// colours or forge log lines.
std::string PrintableUtf8(std::string_view s);

// For a log line: PrintableUtf8 of at most max_bytes of s, "…" marking a cut.
std::string ForLog(std::string_view s, std::size_t max_bytes = 256);

}  // namespace muster
