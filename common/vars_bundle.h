// Vars (secrets) bundles: the plaintext inside the sealed box.
//
// Plaintext format (JSON):
//   {"format":1,"files":[{"path":"key.txt","mode":"0400","owner":"root","group":"root",
//                         "content":"<base64>"}]}
// Paths are relative, use '/' separators, and never contain "", "." or ".."
// components. Directories are implied and created 0700. An optional
// "target":"/abs/dir" names the directory the files are meant for.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

#include "common/error.h"

namespace muster {

struct VarsFile {
  std::string path;
  mode_t mode = 0400;
  std::string owner = "root";
  std::string group = "root";
  std::string content;
};

struct VarsBundle {
  std::vector<VarsFile> files;
  // The directory the operator meant these files for (absolute; "" = the
  // agent's varsDir, whatever it is). 'muster publish --clan' sets it to the
  // machine's secret store directory; an agent whose varsDir differs refuses
  // the generation rather than put a secret store's files where it does not
  // look for them.
  std::string target;
};

struct VarsLimits {
  std::size_t max_files = 10000;
  std::size_t max_file_bytes = 4u << 20;
  std::size_t max_total_bytes = 8u << 20;
};

// Validates one relative path (see header comment).
Status ValidateVarsPath(const std::string& path);

std::string EncodeVarsBundle(const VarsBundle& b);
// Parses and validates every entry (paths, modes, sizes, duplicates).
Result<VarsBundle> DecodeVarsBundle(std::string_view text, const VarsLimits& limits = {});

// Reads a directory tree into a bundle, keeping each file's mode; refuses
// symlinks and special files. Owner and group default to root.
Result<VarsBundle> ReadVarsDirectory(const std::filesystem::path& dir,
                                     const VarsLimits& limits = {});

}  // namespace muster
