// Cheap structural checks on untrusted JSON text before a DOM is built.
#pragma once

#include <cstddef>
#include <string_view>

#include <nlohmann/json.hpp>

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

}  // namespace muster
