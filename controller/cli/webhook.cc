// muster webhook add|list|remove|test: the controller's notification targets.
#include <sodium.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

#include "controller/cli/commands.h"

using nlohmann::json;

namespace muster::cli {

int WebhookAdd(const Globals& g, const std::string& url, const std::vector<std::string>& events,
               const std::string& secret_file) {
  std::string secret;
  bool generated = false;
  if (!secret_file.empty()) {
    std::ifstream f(secret_file);
    if (!f) return Die("cannot read " + secret_file, kExitUsage);
    std::stringstream ss;
    ss << f.rdbuf();
    secret = ss.str();
    while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
  } else {
    unsigned char raw[32];
    randombytes_buf(raw, sizeof raw);
    char hex[sizeof raw * 2 + 1];
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    secret = hex;
    generated = true;
  }
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  json params = {{"url", url}, {"secret", secret}};
  if (!events.empty()) params["events"] = events;
  auto res = conn->Call("webhook.add", params);
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    json out = *res;
    if (generated) out["secret"] = secret;
    std::cout << out.dump() << "\n";
    return 0;
  }
  std::cout << "webhook " << (*res)["id"].get<std::string>() << " added: " << url << " ("
            << (events.empty() ? std::string("every event") : JoinTags(json(events))) << ")\n";
  if (generated) {
    std::cout << "secret: " << secret << "\n";
    std::cerr << "The secret is shown once: give it to the receiver to check the "
                 "X-Muster-Signature-256 header (HMAC-SHA256 of the body).\n";
  }
  return 0;
}

int WebhookList(const Globals& g) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call("webhook.list", json::object());
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << res->dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"WEBHOOK", "URL", "EVENTS", "BY", "CREATED"}};
  for (const auto& w : (*res)["webhooks"]) {
    rows.push_back({w["id"].get<std::string>(), Printable(w["url"].get<std::string>()),
                    w["events"].empty() ? "all" : JoinTags(w["events"]),
                    w["createdBy"].get<std::string>(),
                    Timestamp(w["createdAt"].get<std::int64_t>())});
  }
  PrintTable(rows);
  std::cout << (*res)["queued"].get<std::int64_t>() << " deliveries queued\n";
  return 0;
}

int WebhookRemove(const Globals& g, const std::string& id) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call("webhook.remove", {{"id", id}});
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << res->dump() << "\n";
  } else {
    std::cout << "webhook " << id << " removed (with its queued deliveries)\n";
  }
  return 0;
}

// Queues a test notification and reports the first attempt's outcome.
int WebhookTest(const Globals& g, const std::string& id, int timeout_s) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto sub = conn->Call("subscribe", json::object());
  if (!sub) return Die(sub.message(), kExitFailed);
  auto res = conn->Call("webhook.test", {{"id", id}});
  if (!res) return Die(res.message(), kExitFailed);
  std::string delivery = (*res)["delivery"].get<std::string>();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    auto ev = conn->NextEvent(std::chrono::milliseconds(1000));
    if (!ev) return Die(ev.message(), kExitConnect);
    if (!*ev) continue;
    const auto& e = **ev;
    if (e.topic != "webhook" || e.data.value("delivery", "") != delivery) continue;
    if (g.json_out) {
      std::cout << e.data.dump() << "\n";
      return e.data.value("delivered", false) ? 0 : kExitFailed;
    }
    if (e.data.value("delivered", false)) {
      std::cout << "webhook " << id << ": test delivered (HTTP " << e.data.value("status", 0)
                << ")\n";
      return 0;
    }
    std::cout << "webhook " << id
              << ": test delivery failed: " << Printable(e.data.value("error", "")) << "; "
              << (e.data.value("gaveUp", false)
                      ? std::string("given up")
                      : "retried in " + std::to_string(e.data.value("retryInMs", 0) / 1000) + " s")
              << "\n";
    return kExitFailed;
  }
  return Die("no delivery attempt reported within " + std::to_string(timeout_s) +
                 " s (the test stays queued; see 'muster webhook list')",
             kExitTimeout);
}

}  // namespace muster::cli
