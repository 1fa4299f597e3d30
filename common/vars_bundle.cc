#include "common/vars_bundle.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>

#include "common/crypto.h"
#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/utf8.h"

namespace muster {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {
std::string ModeText(mode_t m) {
  char b[8];
  std::snprintf(b, sizeof b, "%04o", static_cast<unsigned>(m & 07777));
  return b;
}

bool ValidName(const std::string& s) {
  if (s.empty() || s.size() > 32) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
  });
}
}  // namespace

Status ValidateVarsPath(const std::string& path) {
  if (path.empty()) return Err("vars entry has an empty path");
  if (path.size() > 1024) return Err("vars path is longer than 1024 bytes");
  if (path.front() == '/') return Err("vars path '" + path + "' is absolute; it must be relative");
  if (path.find('\0') != std::string::npos) return Err("vars path contains a NUL byte");
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string comp = path.substr(start, end - start);
    if (comp.empty() || comp == "." || comp == "..") {
      return Err("vars path '" + path + "' has an empty, '.' or '..' component");
    }
    start = end + 1;
  }
  return Status::Ok();
}

std::string EncodeVarsBundle(const VarsBundle& b) {
  json files = json::array();
  for (const auto& f : b.files) {
    files.push_back({{"path", f.path},
                     {"mode", ModeText(f.mode)},
                     {"owner", f.owner},
                     {"group", f.group},
                     {"content", Base64Encode(f.content)}});
  }
  json j{{"format", 1}, {"files", files}};
  if (!b.target.empty()) j["target"] = b.target;
  return DumpJson(j);
}

Result<VarsBundle> DecodeVarsBundle(std::string_view text, const VarsLimits& limits) {
  auto parsed = ParseJsonBounded(text, limits.max_total_bytes * 2 + 65536, 6);
  if (!parsed) return Err("vars bundle: " + parsed.message());
  try {
    const json& j = *parsed;
    if (!j.is_object() || !j.at("format").is_number_integer() ||
        j.at("format").get<std::int64_t>() != 1) {
      return Err("vars bundle format is not supported");
    }
    const json& files = j.at("files");
    if (!files.is_array()) return Err("vars bundle 'files' is not a list");
    if (files.size() > limits.max_files) {
      return Err("vars bundle has " + std::to_string(files.size()) + " files; the limit is " +
                 std::to_string(limits.max_files));
    }
    VarsBundle b;
    if (j.contains("target")) {
      b.target = j.at("target").get<std::string>();
      if (b.target.size() < 2 || b.target[0] != '/' || b.target.size() > 4096 ||
          b.target.find("/../") != std::string::npos || b.target.find('\0') != std::string::npos ||
          b.target.ends_with("/..")) {
        return Err("vars bundle 'target' must be an absolute directory path");
      }
    }
    std::set<std::string> seen;
    std::size_t total = 0;
    for (const auto& e : files) {
      VarsFile f;
      f.path = e.at("path").get<std::string>();
      if (auto st = ValidateVarsPath(f.path); !st) return st.error();
      if (!seen.insert(f.path).second) return Err("vars path '" + f.path + "' appears twice");
      std::string mode = e.value("mode", std::string("0400"));
      if (mode.empty() || mode.size() > 4 ||
          mode.find_first_not_of("01234567") != std::string::npos) {
        return Err("vars path '" + f.path + "' has invalid mode '" + mode + "'");
      }
      f.mode = static_cast<mode_t>(std::stoul(mode, nullptr, 8));
      if (f.mode & 07000) return Err("vars path '" + f.path + "' asks for setuid/setgid/sticky");
      f.owner = e.value("owner", std::string("root"));
      f.group = e.value("group", std::string("root"));
      if (!ValidName(f.owner) || !ValidName(f.group)) {
        return Err("vars path '" + f.path + "' names an invalid owner or group");
      }
      auto content = Base64Decode(e.at("content").get<std::string>());
      if (!content) return Err("vars path '" + f.path + "' has content that is not base64");
      f.content = std::move(*content);
      if (f.content.size() > limits.max_file_bytes) {
        return Err("vars file '" + f.path + "' is larger than " +
                   std::to_string(limits.max_file_bytes) + " bytes");
      }
      total += f.content.size();
      if (total > limits.max_total_bytes) {
        return Err("vars bundle is larger than " + std::to_string(limits.max_total_bytes) +
                   " bytes");
      }
      b.files.push_back(std::move(f));
    }
    // A file may not also be a directory of another entry ("a" and "a/b").
    for (const auto& p : seen) {
      auto it = seen.lower_bound(p + "/");
      if (it != seen.end() && it->compare(0, p.size() + 1, p + "/") == 0) {
        return Err("vars path '" + p + "' is both a file and a directory");
      }
    }
    return b;
  } catch (const std::exception& e) {
    return Err(std::string("vars bundle entry is malformed: ") + e.what());
  }
}

Result<VarsBundle> ReadVarsDirectory(const fs::path& dir, const VarsLimits& limits) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Err("vars directory " + dir.string() + " does not exist");
  VarsBundle b;
  std::size_t total = 0;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0) return Err("cannot stat " + it->path().string());
    if (S_ISDIR(st.st_mode)) continue;
    std::string rel = it->path().lexically_relative(dir).generic_string();
    if (!IsValidUtf8(rel)) {
      return Err("vars entry '" + SanitizeUtf8(rel) +
                 "' has a name that is not valid UTF-8; rename it (bundle paths are JSON text)");
    }
    if (S_ISLNK(st.st_mode)) return Err("vars entry " + rel + " is a symlink; links are refused");
    if (!S_ISREG(st.st_mode)) return Err("vars entry " + rel + " is not a regular file");
    auto content = ReadFile(it->path(), limits.max_file_bytes);
    if (!content) return content.error();
    total += content->size();
    if (total > limits.max_total_bytes) return Err("vars directory is too large");
    VarsFile f;
    f.path = rel;
    f.mode = st.st_mode & 0777;
    f.content = std::move(*content);
    b.files.push_back(std::move(f));
    if (b.files.size() > limits.max_files) return Err("vars directory has too many files");
  }
  if (ec) return Err("cannot read vars directory " + dir.string() + ": " + ec.message());
  std::sort(b.files.begin(), b.files.end(),
            [](const VarsFile& a, const VarsFile& c) { return a.path < c.path; });
  return b;
}

}  // namespace muster
