// JSON at the edges: cheap structural checks on untrusted text before a DOM is
// built, and an encoder that cannot throw.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/error.h"

namespace muster {

constexpr std::size_t kDefaultMaxMessageBytes = 1 << 20;  // 1 MiB
constexpr int kDefaultMaxJsonDepth = 32;

// Rejects text longer than max_bytes or nesting deeper than max_depth, scanning
// once without allocating. Strings are skipped correctly (brackets inside them
// do not count). Returns OK if the text may be handed to the parser.
Status CheckJsonLimits(std::string_view text, std::size_t max_bytes = kDefaultMaxMessageBytes,
                       int max_depth = kDefaultMaxJsonDepth);

// CheckJsonLimits, then parse without exceptions escaping. On failure the error
// says what was wrong with the text.
Result<nlohmann::json> ParseJsonBounded(std::string_view text,
                                        std::size_t max_bytes = kDefaultMaxMessageBytes,
                                        int max_depth = kDefaultMaxJsonDepth);

// j.dump(indent) that never throws: an ill-formed UTF-8 string anywhere in j
// (one that missed SanitizeUtf8) is written with U+FFFD in place of the bad
// bytes. Use it for every dump of data that may hold strings from outside.
std::string DumpJson(const nlohmann::json& j, int indent = -1);

// The integer field key of object j that fits int64; throws json::type_error
// otherwise (get<int64_t>() alone would convert floats, undefined behaviour when
// out of range, and wrap large unsigneds). For parsers inside a try block.
std::int64_t JsonInt64Field(const nlohmann::json& j, const char* key);

}  // namespace muster
