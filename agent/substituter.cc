#include "agent/substituter.h"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>
#include <future>
#include <map>
#include <optional>
#include <set>

#include "common/crypto.h"
#include "common/process.h"

namespace muster {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

bool UsesControllerCache(const Manifest& m) {
  for (const auto& s : m.substituters) {
    if (s == kControllerSubstituter) return true;
  }
  return false;
}

Manifest WithControllerCache(Manifest m, const std::string& url) {
  for (auto& s : m.substituters) {
    if (s == kControllerSubstituter) s = url;
  }
  return m;
}

namespace {
constexpr auto kRequestTimeout = std::chrono::seconds(120);

bool ValidName(const std::string& n) {
  if (n == "nix-cache-info") return true;
  if (n.empty() || n.size() > 256 || n.find("..") != std::string::npos) return false;
  for (char c : n) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == '_' || c == '/';
    if (!ok) return false;
  }
  return true;
}
}  // namespace

class HttpConn;

struct Substituter::Impl : std::enable_shared_from_this<Substituter::Impl> {
  Impl(asio::io_context& c, SendFn s) : ioc(c), send(std::move(s)) {}
  asio::io_context& ioc;
  SendFn send;
  std::optional<tcp::acceptor> acceptor;
  std::string token;
  std::uint64_t next_id = 1;
  // Both own their request until it ends (HttpConn::Close erases it): while
  // it waits for the controller, no socket operation holds it.
  std::map<std::uint64_t, std::shared_ptr<HttpConn>> waiting;  // fetch id → request
  std::map<HttpConn*, std::shared_ptr<HttpConn>> conns;
  std::deque<std::weak_ptr<HttpConn>> queued;  // beyond kMaxRequests
  // Requests whose fetch was lost with the connection: asked again, from the
  // same offset, once it is back (objects never change), or cut by their
  // no-progress timer. nix cannot retry a NAR it has begun to unpack.
  std::vector<std::shared_ptr<HttpConn>> stalled;
  // Requests that want a chunk while kMaxInFlight are on their way, first
  // come first served as answers free the slots.
  std::deque<std::weak_ptr<HttpConn>> hungry;
  std::size_t active = 0;

  bool HasSlot() const { return waiting.size() < Substituter::kMaxInFlight; }
  // Lets waiting requests ask while there are free slots.
  void Feed();
  void Accept();
  bool Fetch(const std::shared_ptr<HttpConn>& c, const std::string& name, std::uint64_t offset);
  void CutAll();
};

class HttpConn : public std::enable_shared_from_this<HttpConn> {
 public:
  HttpConn(tcp::socket s, std::shared_ptr<Substituter::Impl> owner)
      : sock_(std::move(s)), timer_(sock_.get_executor()), owner_(std::move(owner)) {}

  void Start() {
    owner_->conns[this] = shared_from_this();
    Arm();
    http::async_read(
        sock_, buf_, req_,
        [self = shared_from_this()](beast::error_code ec, std::size_t) { self->OnRequest(ec); });
  }

  // Called when admitted under kMaxRequests. The first chunk tells the
  // object's size; the next ones are asked for a window at a time.
  void Begin() {
    began_ = true;
    ++owner_->active;
    Ask();
  }

  // A slot may be free: asks for what this request needs next.
  void Wake() {
    hungry_ = false;
    if (closed_) return;
    Ask();
  }

  void OnChunk(proto::Fetched f) {
    if (in_flight_ > 0) --in_flight_;
    if (closed_) return;
    Arm();
    if (!header_sent_ && f.status != 200) {
      int status = f.status == 404 ? 404 : 500;
      Reply(status, f.error.empty() ? "not found" : f.error);
      return;
    }
    if (f.status != 200 || f.offset < next_offset_ || f.offset % Substituter::kChunkBytes != 0 ||
        (header_sent_ && f.total != total_) || (f.data.empty() && f.offset < f.total) ||
        (f.data.size() < Substituter::kChunkBytes && f.offset + f.data.size() < f.total) ||
        ready_.count(f.offset)) {
      return Cut("controller answer does not continue the object (offset " +
                 std::to_string(f.offset) + ")");
    }
    if (!header_sent_) {
      total_ = f.total;
      header_sent_ = true;
      bool text = name_ == "nix-cache-info" ||
                  (name_.size() > 8 && name_.substr(name_.size() - 8) == ".narinfo");
      std::string ct = text ? "text/x-nix-narinfo" : "application/x-nix-nar";
      std::string head = "HTTP/1.1 200 OK\r\nContent-Type: " + ct +
                         "\r\nContent-Length: " + std::to_string(total_) +
                         "\r\nConnection: close\r\n\r\n";
      out_.push_back(std::move(head));
    }
    // Answers may come in any order; they are written in order.
    ready_[f.offset] = std::move(f.data);
    for (auto it = ready_.begin(); it != ready_.end() && it->first == next_offset_;
         it = ready_.erase(it)) {
      std::size_t n = it->second.size();
      next_offset_ += n;
      if (!head_only_ && n > 0) out_.push_back(std::move(it->second));
    }
    Pump();
  }

  void Cut(const std::string& why) {
    if (closed_) return;
    spdlog::debug("substituter: {}: {}", name_, why);
    Close();
  }

  bool closed() const { return closed_; }

  // The connection is back: ask again for what was lost (chunks that
  // arrived out of order are asked for again too: objects never change).
  void Resend() {
    if (closed_) return;
    in_flight_ = 0;
    ready_.clear();
    req_offset_ = next_offset_;
    stalled_ = false;
    Ask();
  }

 private:
  void Arm() {
    timer_.expires_after(kRequestTimeout);
    timer_.async_wait([w = weak_from_this()](beast::error_code ec) {
      if (ec) return;
      if (auto self = w.lock()) self->Cut("no progress for 120 s");
    });
  }

  void OnRequest(beast::error_code ec) {
    if (ec) return Close();
    std::string target(req_.target());
    std::string prefix = "/" + owner_->token + "/";
    head_only_ = req_.method() == http::verb::head;
    if (req_.method() != http::verb::get && !head_only_) return Reply(405, "GET only");
    if (target.rfind(prefix, 0) != 0) return Reply(404, "not found");
    name_ = target.substr(prefix.size());
    if (!ValidName(name_)) return Reply(404, "not found");
    if (owner_->active >= Substituter::kMaxRequests) {
      owner_->queued.push_back(weak_from_this());
      return;
    }
    Begin();
  }

  void Reply(int status, const std::string& body) {
    std::string reason = status == 404   ? "Not Found"
                         : status == 405 ? "Method Not Allowed"
                                         : "Internal Server Error";
    std::string b = body + "\n";
    out_.push_back("HTTP/1.1 " + std::to_string(status) + " " + reason +
                   "\r\nContent-Type: text/plain\r\nContent-Length: " + std::to_string(b.size()) +
                   "\r\nConnection: close\r\n\r\n" + (head_only_ ? "" : b));
    total_ = 0;
    next_offset_ = 0;
    header_sent_ = true;
    finishing_ = true;
    Pump();
  }

  // Asks for the chunk at offset; false (and parked until the connection is
  // back) when it cannot be sent.
  bool Request(std::uint64_t offset) {
    if (stalled_) return false;
    if (!owner_->Fetch(shared_from_this(), name_, offset)) {
      stalled_ = true;
      owner_->stalled.push_back(shared_from_this());
      return false;
    }
    ++in_flight_;
    req_offset_ = offset + Substituter::kChunkBytes;
    return true;
  }

  // Asks for the first chunk (which tells the object's size) or for the
  // next ones, up to kWindow on their way or waiting to be written, so that
  // the controller's latency hides behind the chunks already here. The
  // chunks on their way over all requests are bounded (kMaxInFlight): the
  // controller queues every answer for this one connection, and cuts a peer
  // for which it holds too much. A request that finds no slot free and has
  // nothing on its way waits its turn (Impl::Feed).
  void Ask() {
    if (closed_ || stalled_ || finishing_) return;
    if (!header_sent_) {
      if (in_flight_ > 0) return;
      if (!owner_->HasSlot()) return Hungry();
      Request(0);
      return;
    }
    Pump();
  }

  void Hungry() {
    if (hungry_) return;
    hungry_ = true;
    owner_->hungry.push_back(weak_from_this());
  }

  // Writes what is queued, and asks for more (Ask).
  void Pump() {
    if (closed_) return;
    bool complete = finishing_ || (header_sent_ && next_offset_ >= total_);
    if (!complete && header_sent_ && !stalled_) {
      while (req_offset_ < total_ &&
             in_flight_ + ready_.size() + out_.size() < Substituter::kWindow) {
        if (!owner_->HasSlot()) {
          if (in_flight_ == 0) Hungry();
          break;
        }
        if (!Request(req_offset_)) break;
      }
    }
    if (writing_) return;
    if (out_.empty()) {
      if (complete) Finish();
      return;
    }
    writing_ = true;
    asio::async_write(sock_, asio::buffer(out_.front()),
                      [self = shared_from_this()](beast::error_code ec, std::size_t) {
                        self->writing_ = false;
                        if (ec) return self->Close();
                        self->out_.pop_front();
                        self->Pump();
                      });
  }

  void Finish() {
    beast::error_code ig;
    sock_.shutdown(tcp::socket::shutdown_send, ig);
    Close();
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    auto keep = shared_from_this();  // the erase below may drop the last owner
    timer_.cancel();
    beast::error_code ig;
    sock_.close(ig);
    owner_->conns.erase(this);
    if (began_) {
      --owner_->active;
      // Admit the next queued request.
      while (!owner_->queued.empty()) {
        auto next = owner_->queued.front().lock();
        owner_->queued.pop_front();
        if (next && !next->closed_) {
          next->Begin();
          break;
        }
      }
    }
  }

  tcp::socket sock_;
  asio::steady_timer timer_;
  std::shared_ptr<Substituter::Impl> owner_;
  beast::flat_buffer buf_;
  http::request<http::empty_body> req_;
  std::string name_;
  std::deque<std::string> out_;
  std::uint64_t total_ = 0;
  std::uint64_t next_offset_ = 0;               // next byte to write to nix
  std::uint64_t req_offset_ = 0;                // next byte to ask the controller for
  std::size_t in_flight_ = 0;                   // fetches asked and not answered
  std::map<std::uint64_t, std::string> ready_;  // answers ahead of next_offset_
  bool stalled_ = false;                        // parked until the connection is back
  bool hungry_ = false;                         // in owner_->hungry
  bool head_only_ = false;
  bool header_sent_ = false;
  bool finishing_ = false;
  bool writing_ = false;
  bool began_ = false;
  bool closed_ = false;
};

void Substituter::Impl::Accept() {
  if (!acceptor) return;
  acceptor->async_accept([self = shared_from_this()](beast::error_code ec, tcp::socket s) {
    if (ec || !self->acceptor) return;
    SetCloseOnExec(s.native_handle());
    std::make_shared<HttpConn>(std::move(s), self)->Start();
    self->Accept();
  });
}

bool Substituter::Impl::Fetch(const std::shared_ptr<HttpConn>& c, const std::string& name,
                              std::uint64_t offset) {
  std::uint64_t id = next_id++;
  proto::Fetch f{id, name, offset, kChunkBytes};
  if (!send(proto::Encode(f))) return false;
  waiting[id] = c;
  return true;
}

void Substituter::Impl::Feed() {
  while (HasSlot() && !hungry.empty()) {
    auto c = hungry.front().lock();
    hungry.pop_front();
    if (c && !c->closed()) c->Wake();
  }
}

void Substituter::Impl::CutAll() {
  std::vector<std::shared_ptr<HttpConn>> all;
  for (auto& [p, c] : conns) all.push_back(c);
  for (auto& c : all) c->Cut("cut");
  waiting.clear();
  queued.clear();
  stalled.clear();
  hungry.clear();
}

Substituter::Substituter(asio::io_context& ioc, SendFn send)
    : impl_(std::make_shared<Impl>(ioc, std::move(send))) {}

Substituter::~Substituter() = default;

Result<std::string> Substituter::Open() {
  std::promise<Result<std::string>> done;
  auto fut = done.get_future();
  asio::post(impl_->ioc, [impl = impl_, &done] {
    beast::error_code ec;
    impl->acceptor.emplace(impl->ioc);
    tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), 0);
    impl->acceptor->open(ep.protocol(), ec);
    if (!ec) impl->acceptor->bind(ep, ec);
    if (!ec) impl->acceptor->listen(64, ec);
    if (ec) {
      impl->acceptor.reset();
      done.set_value(Err("cannot listen on 127.0.0.1 for the controller's cache: " + ec.message()));
      return;
    }
    SetCloseOnExec(impl->acceptor->native_handle());
    impl->token = HexEncode(SecretKey::Generate().seed().substr(0, 16));
    std::string url =
        "http://127.0.0.1:" + std::to_string(impl->acceptor->local_endpoint().port()) + "/" +
        impl->token;
    impl->Accept();
    done.set_value(url);
  });
  return fut.get();
}

void Substituter::Close() {
  std::promise<void> done;
  auto fut = done.get_future();
  asio::post(impl_->ioc, [impl = impl_, &done] {
    if (impl->acceptor) {
      beast::error_code ig;
      impl->acceptor->close(ig);
      impl->acceptor.reset();
    }
    impl->CutAll();
    impl->token.clear();
#ifdef __GLIBC__
    ::malloc_trim(0);  // the chunks' heap (agent/main.cc keeps it while fetching)
#endif
    done.set_value();
  });
  fut.wait();
}

void Substituter::OnFetched(proto::Fetched f) {
  auto it = impl_->waiting.find(f.id);
  if (it == impl_->waiting.end()) return;  // an answer for a request already cut
  auto c = std::move(it->second);
  impl_->waiting.erase(it);
  if (c) c->OnChunk(std::move(f));
  impl_->Feed();  // a slot is free
}

void Substituter::OnLinkDown() {
  // Requests in flight will never be answered on the new connection: they
  // wait for it and ask again from where they were (each once, however many
  // chunks it had on their way).
  std::set<HttpConn*> seen;
  for (auto& s : impl_->stalled) seen.insert(s.get());
  for (auto& [id, c] : impl_->waiting) {
    if (!c->closed() && seen.insert(c.get()).second) impl_->stalled.push_back(c);
  }
  impl_->waiting.clear();
  if (!impl_->stalled.empty()) {
    spdlog::info(
        "substituter: connection to the controller lost; {} request(s) resume when it is back",
        impl_->stalled.size());
  }
}

void Substituter::OnLinkUp() {
  auto stalled = std::move(impl_->stalled);
  impl_->stalled.clear();
  std::set<HttpConn*> done;
  for (auto& c : stalled) {
    if (done.insert(c.get()).second) c->Resend();
  }
  impl_->Feed();
}

}  // namespace muster
