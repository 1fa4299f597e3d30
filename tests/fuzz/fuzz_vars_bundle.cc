// DecodeVarsBundle on arbitrary plaintext (what comes out of an opened sealed
// box). Whatever it accepts must hold only safe relative paths, no
// setuid/setgid/sticky modes, stay within the limits, and round-trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/vars_bundle.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace muster;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  VarsLimits limits;
  limits.max_files = 64;
  limits.max_file_bytes = 4096;
  limits.max_total_bytes = 16384;
  auto b = DecodeVarsBundle(text, limits);
  if (!b.ok()) return 0;
  if (b->files.size() > limits.max_files) std::abort();
  std::size_t total = 0;
  for (const auto& f : b->files) {
    if (!ValidateVarsPath(f.path).ok()) std::abort();
    if (f.path.find("..") != std::string::npos) {
      // ".." may appear inside a name ("a..b") but never as a component.
      std::string p = "/" + f.path + "/";
      if (p.find("/../") != std::string::npos) std::abort();
    }
    if ((f.mode & ~static_cast<mode_t>(0777)) != 0) std::abort();
    if (f.content.size() > limits.max_file_bytes) std::abort();
    total += f.content.size();
  }
  if (total > limits.max_total_bytes) std::abort();
  std::string once = EncodeVarsBundle(*b);
  auto again = DecodeVarsBundle(once, limits);
  if (!again.ok() || EncodeVarsBundle(*again) != once) std::abort();
  return 0;
}
