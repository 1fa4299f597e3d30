// proto::Decode on arbitrary bytes: must never crash or throw, and whatever it
// accepts must survive Encode → Decode unchanged (what the golden files rely on).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/protocol.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace muster::proto;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto m = Decode(text);
  if (!m.ok()) {
    if (m.message().empty()) std::abort();  // every refusal says why
    return 0;
  }
  std::string once = Encode(*m);
  auto again = Decode(once);
  if (!again.ok()) {
    std::fprintf(stderr, "re-decoding failed: %s\n%s\n", again.message().c_str(), once.c_str());
    std::abort();
  }
  if (TypeName(*again) != TypeName(*m) || Encode(*again) != once) {
    std::fprintf(stderr, "encode/decode is not stable:\n%s\n", once.c_str());
    std::abort();
  }
  return 0;
}
