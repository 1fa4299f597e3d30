#include "bench/publisher.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <ctime>
#include <functional>
#include <mutex>
#include <thread>

#include "bench/keys.h"
#include "bench/sim.h"
#include "common/manifest.h"
#include "common/protocol.h"
#include "common/tls.h"
#include "common/ws_client.h"

namespace muster::bench {

PublishResult PublishAll(const PublishOptions& o) {
  PublishResult res;
  res.response_ns.assign(o.count, 0);
  SecretKey op = OperatorKey();
  std::vector<std::string> requests;
  requests.reserve(o.count);
  for (std::uint32_t i = 0; i < o.count; ++i) {
    Manifest m;
    m.machine = AgentName(i);
    m.generation = o.generation;
    m.toplevel = o.toplevel;
    m.kind = Kind::kNixos;
    m.action = Action::kSwitch;
    m.created_at = static_cast<std::int64_t>(std::time(nullptr));
    SignedManifest sm = SignManifest(m, op);
    proto::Request r;
    r.id = i + 1;
    r.method = "publish";
    r.params = {{"manifest", sm.manifest},
                {"signer", sm.signer},
                {"signature", sm.signature},
                {"vars", ""}};
    requests.push_back(proto::Encode(r));
  }
  auto tls = tls::MakeClientContext(op, o.pin);
  if (!tls) {
    res.error = tls.message();
    return res;
  }
  boost::asio::io_context ioc;
  ClientOptions co;
  co.url = WsUrl{o.host, o.port, "/v1/operator"};
  co.tls = *tls;
  co.max_message_bytes = 16 << 20;
  co.user_agent = "muster-loadgen";
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::uint32_t answered = 0;
  std::shared_ptr<WsClient> client;
  WsClient::Handlers h;
  boost::asio::steady_timer pace(ioc);
  std::uint32_t next = 0;
  std::function<void()> send_next = [&] {
    const std::int64_t now = NowNs();
    // Each request at start + i / rate; a late tick sends what is due.
    while (next < o.count && now >= res.start_ns + static_cast<std::int64_t>(next * 1e9 / o.rate)) {
      res.sent_ns[next] = NowNs();
      client->Send(std::move(requests[next++]));
    }
    if (next == o.count) return;
    pace.expires_at(std::chrono::steady_clock::now() +
                    std::chrono::nanoseconds(res.start_ns +
                                             static_cast<std::int64_t>(next * 1e9 / o.rate) - now));
    pace.async_wait([&](boost::system::error_code ec) {
      if (!ec) send_next();
    });
  };
  h.on_open = [&] {
    res.start_ns = NowNs();
    if (o.rate <= 0) {
      for (auto& r : requests) client->Send(std::move(r));
      return;
    }
    res.sent_ns.assign(o.count, 0);
    send_next();
  };
  h.on_message = [&](std::string text) {
    auto msg = proto::Decode(text, {16 << 20, 32});
    if (!msg) return;
    const auto* r = std::get_if<proto::Response>(&*msg);
    if (!r || r->id == 0 || r->id > o.count) return;
    res.response_ns[r->id - 1] = NowNs();
    if (r->ok) {
      ++res.ok;
    } else {
      ++res.failed;
      if (res.error.empty())
        res.error = AgentName(static_cast<std::uint32_t>(r->id - 1)) + ": " + r->error;
    }
    if (++answered == o.count) {
      std::lock_guard lock(mu);
      done = true;
      cv.notify_all();
      client->Close("done");
    }
  };
  h.on_close = [&](std::string reason) {
    std::lock_guard lock(mu);
    if (!done && res.error.empty()) res.error = "operator connection ended: " + reason;
    done = true;
    cv.notify_all();
  };
  client = WsClient::Create(ioc.get_executor(), co, std::move(h));
  client->Connect();
  std::thread t([&] { ioc.run(); });
  bool timed_out = false;
  {
    std::unique_lock lock(mu);
    timed_out = !cv.wait_for(lock, o.timeout, [&] { return done; });
  }
  client->Abort();
  ioc.stop();
  t.join();
  if (timed_out) {
    res.error = "timed out after " + std::to_string(o.timeout.count()) + " s with " +
                std::to_string(answered) + " of " + std::to_string(o.count) + " answered";
  }
  return res;
}

}  // namespace muster::bench
