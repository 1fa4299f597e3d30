#include "agent/substituter.h"

#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <deque>
#include <mutex>
#include <thread>

namespace muster {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// The byte at offset i of object `name` (each object tells its own bytes).
char ByteOf(const std::string& name, std::uint64_t i) {
  return static_cast<char>((i * 131 + name.size() * 7 + static_cast<unsigned char>(name.back())) &
                           0xff);
}

// GET of one object through the substituter, as nix does it; the body or "".
std::string Get(const std::string& url, const std::string& name) {
  try {
    // url is http://127.0.0.1:PORT/TOKEN
    std::string rest = url.substr(std::string("http://127.0.0.1:").size());
    std::string port = rest.substr(0, rest.find('/'));
    std::string token = rest.substr(rest.find('/'));
    asio::io_context ioc;
    tcp::socket sock(ioc);
    sock.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"),
                               static_cast<unsigned short>(std::stoi(port))));
    http::request<http::empty_body> req(http::verb::get, token + "/" + name, 11);
    req.set(http::field::host, "127.0.0.1");
    http::write(sock, req);
    beast::flat_buffer buf;
    http::response_parser<http::string_body> p;
    p.body_limit(64 << 20);
    http::read(sock, buf, p);
    return p.get().result_int() == 200 ? p.get().body() : "";
  } catch (const std::exception&) {
    return "";
  }
}

// Many NARs asked for at once (nix ≥ 2.13 substitutes 16 paths in
// parallel): what the agent has asked the controller for and not received
// never exceeds kMaxInFlight chunks, whatever the number of requests, and
// every request still ends with its whole object, in order.
TEST(Substituter, ChunksOnTheirWayAreBoundedOverAllRequests) {
  asio::io_context ioc;
  auto work = asio::make_work_guard(ioc);
  std::thread io([&] { ioc.run(); });

  std::mutex mu;
  std::deque<proto::Fetch> asked;  // sent by the agent, not answered yet
  Substituter sub(ioc, [&](std::string text) {
    auto m = proto::Decode(text);
    if (!m) return false;
    const auto* f = std::get_if<proto::Fetch>(&*m);
    if (!f) return false;
    std::lock_guard lock(mu);
    asked.push_back(*f);
    return true;
  });
  auto url = sub.Open();
  ASSERT_TRUE(url.ok()) << url.message();

  constexpr int kObjects = 16;
  constexpr std::uint64_t kSize = 3 * Substituter::kChunkBytes + 1234;
  std::vector<std::string> bodies(kObjects);
  std::vector<std::thread> clients;
  for (int i = 0; i < kObjects; ++i) {
    std::string name = "nar/" + std::string(32, 'a' + static_cast<char>(i % 20)) + "-" +
                       std::to_string(i) + ".nar";
    clients.emplace_back([&, i, name] { bodies[i] = Get(*url, name); });
  }

  // The controller, slow: it lets requests pile up, then answers one at a
  // time, and counts what was on its way at the most.
  std::size_t most = 0, answered = 0;
  std::size_t want = kObjects * 4;  // chunks: 3 whole and one short per object
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (answered < want && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    proto::Fetch f;
    {
      std::lock_guard lock(mu);
      most = std::max(most, asked.size());
      if (asked.empty()) continue;
      f = asked.front();
      asked.pop_front();
    }
    proto::Fetched r;
    r.id = f.id;
    r.offset = f.offset;
    r.total = kSize;
    std::uint64_t n = std::min<std::uint64_t>(f.length, kSize - std::min(kSize, f.offset));
    for (std::uint64_t k = 0; k < n; ++k) r.data.push_back(ByteOf(f.name, f.offset + k));
    asio::post(ioc, [&sub, r = std::move(r)]() mutable { sub.OnFetched(std::move(r)); });
    ++answered;
  }
  for (auto& c : clients) c.join();
  sub.Close();
  work.reset();
  ioc.stop();
  io.join();

  EXPECT_EQ(answered, want);
  EXPECT_LE(most, Substituter::kMaxInFlight) << "chunks asked for and not yet answered";
  EXPECT_GE(most, Substituter::kMaxInFlight / 2) << "the requests did run side by side";
  for (int i = 0; i < kObjects; ++i) {
    std::string name = "nar/" + std::string(32, 'a' + static_cast<char>(i % 20)) + "-" +
                       std::to_string(i) + ".nar";
    ASSERT_EQ(bodies[i].size(), kSize) << name;
    bool same = true;
    for (std::uint64_t k = 0; k < kSize && same; ++k) same = bodies[i][k] == ByteOf(name, k);
    EXPECT_TRUE(same) << name << " arrived whole and in order";
  }
}

}  // namespace
}  // namespace muster
