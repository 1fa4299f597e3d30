#include "common/json_limits.h"

#include <string>

namespace muster {

Status CheckJsonLimits(std::string_view text, std::size_t max_bytes, int max_depth) {
  if (text.size() > max_bytes) {
    return Err("message of " + std::to_string(text.size()) + " bytes exceeds the limit of " +
               std::to_string(max_bytes) + " bytes");
  }
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '{':
      case '[':
        if (++depth > max_depth) {
          return Err("JSON nesting deeper than " + std::to_string(max_depth) + " levels");
        }
        break;
      case '}':
      case ']':
        if (--depth < 0) return Err("malformed JSON: unbalanced brackets");
        break;
      default:
        break;
    }
  }
  return Status::Ok();
}

Result<nlohmann::json> ParseJsonBounded(std::string_view text, std::size_t max_bytes,
                                        int max_depth) {
  if (auto st = CheckJsonLimits(text, max_bytes, max_depth); !st) return st.error();
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Err("malformed JSON");
  return j;
}

std::string DumpJson(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::int64_t JsonInt64Field(const nlohmann::json& j, const char* key) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number_integer() ||
      (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))) {
    throw nlohmann::json::type_error::create(302, std::string(key) + " must be an integer", &v);
  }
  return v.get<std::int64_t>();
}

}  // namespace muster
