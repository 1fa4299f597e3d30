// muster dashboard token: access to a dashboard that listens beyond loopback.
#include <sodium.h>

#include <iostream>

#include "controller/cli/commands.h"

using nlohmann::json;

namespace muster::cli {

int DashboardToken(const Globals& g, const std::string& base_url, bool revoke_all) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  if (revoke_all) {
    auto res = conn->Call("dashboard.revoke", json::object());
    if (!res) return Die(res.message(), kExitFailed);
    if (g.json_out) {
      std::cout << res->dump() << "\n";
    } else {
      std::cout << "revoked " << res->value("revoked", 0)
                << " dashboard token(s); open dashboards lose access within 15 seconds\n";
    }
    return 0;
  }
  // 32 random bytes, hex: made here, only its hash reaches the controller.
  unsigned char raw[32];
  randombytes_buf(raw, sizeof raw);
  char hex[sizeof raw * 2 + 1];
  sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
  std::string token(hex);
  sodium_memzero(raw, sizeof raw);
  auto res = conn->Call("dashboard.token", {{"hash", Sha256Hex(token)}});
  if (!res) return Die(res.message(), kExitFailed);
  std::string base = base_url;
  while (!base.empty() && base.back() == '/') base.pop_back();
  if (g.json_out) {
    json out = {{"token", token}};
    if (!base.empty()) out["url"] = base + "/?token=" + token;
    std::cout << out.dump() << "\n";
    return 0;
  }
  std::cout << token << "\n";
  std::cerr << "This token is shown once; the controller keeps only its hash.\n"
            << "Open " << (base.empty() ? std::string("http://HTTP-LISTEN-ADDRESS") : base)
            << "/?token=" << token
            << " (the dashboard then keeps it in a cookie), or send it as "
               "'Authorization: Bearer TOKEN'.\n"
            << "Revoke every token with 'muster dashboard token --revoke-all'.\n";
  return 0;
}

}  // namespace muster::cli
