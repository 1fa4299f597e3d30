#include "bench/fetch.h"

#include <zstd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "bench/keys.h"
#include "bench/sim.h"
#include "common/narinfo.h"
#include "common/protocol.h"
#include "common/tls.h"
#include "common/ws_client.h"

namespace muster::bench {

namespace {

struct Shared {
  explicit Shared(const FetchOptions& options) : o(options) {}
  const FetchOptions& o;
  std::mutex mu;
  std::condition_variable cv;
  std::uint32_t finished = 0;  // done or failed
  std::atomic<std::uint64_t> bytes{0};
  std::atomic<std::uint32_t> verified{0};
  std::int64_t start_ns = 0, end_ns = 0;
  std::uint32_t done = 0;
  std::string error;

  void Finish(const std::string& why) {
    std::lock_guard lock(mu);
    ++finished;
    if (why.empty()) {
      ++done;
      end_ns = std::max(end_ns, NowNs());
    } else if (error.empty()) {
      error = why;
    }
    cv.notify_all();
  }
  void Welcomed() {
    std::lock_guard lock(mu);
    if (!start_ns) start_ns = NowNs();
  }
};

// One machine. Every handler runs on its client's strand.
class Machine : public std::enable_shared_from_this<Machine> {
 public:
  Machine(std::uint32_t index, Shared& s) : index_(index), s_(s) {
    for (const auto& h : s_.o.hashes) objects_.push_back(h + ".narinfo");
  }

  bool Start(boost::asio::io_context& ioc) {
    auto tls = tls::MakeClientContext(AgentKey(index_), s_.o.pin);
    if (!tls) {
      s_.Finish(tls.message());
      return false;
    }
    ClientOptions co;
    co.url = WsUrl{s_.o.host, s_.o.port, "/v1/agent"};
    co.tls = *tls;
    co.max_message_bytes = proto::kMaxFetchedFrameBytes;
    co.user_agent = "muster-loadgen";
    co.idle_timeout = std::chrono::seconds(120);
    WsClient::Handlers h;
    auto self = shared_from_this();
    h.on_open = [self] {
      proto::Hello hello;
      hello.machine = AgentName(self->index_);
      hello.agent_version = "loadgen";
      self->client_->Send(proto::Encode(hello));
    };
    h.on_message = [self](std::string text) { self->OnMessage(text); };
    h.on_close = [self](std::string reason) {
      if (!self->ended_) self->End("connection closed: " + reason);
    };
    client_ = WsClient::Create(ioc.get_executor(), std::move(co), std::move(h));
    client_->Connect();
    return true;
  }

 private:
  void OnMessage(const std::string& text) {
    if (ended_) return;
    auto msg = proto::Decode(text, {.max_bytes = proto::kMaxFetchedFrameBytes});
    if (!msg) return End("bad message: " + msg.message());
    if (std::holds_alternative<proto::Welcome>(*msg)) {
      s_.Welcomed();
      return NextObject();
    }
    if (auto* e = std::get_if<proto::ErrorMsg>(&*msg)) return End("controller: " + e->message);
    auto* f = std::get_if<proto::Fetched>(&*msg);
    if (!f) return;  // a deploy, an ack: not this bench's business
    --in_flight_;
    if (f->status != 200)
      return End(name_ + ": status " + std::to_string(f->status) + " " + f->error);
    if (f->offset != received_) return End(name_ + ": answer out of order");
    std::uint64_t want = std::min<std::uint64_t>(s_.o.chunk, f->total - f->offset);
    if (f->data.size() != want) return End(name_ + ": short chunk");
    total_ = f->total;
    received_ += f->data.size();
    s_.bytes += f->data.size();
    if (is_narinfo_) {
      text_ += f->data;
    } else if (hash_) {
      if (!Verify(f->data)) return End(name_ + ": not valid zstd");
    }
    if (received_ >= total_) return ObjectDone();
    Pump();
  }

  void ObjectDone() {
    if (is_narinfo_) {
      auto info = nar::ParseNarInfo(text_);
      if (!info) return End(name_ + ": " + info.message());
      objects_.push_front(info->url);
      nar_hash_ = info->nar_hash;
      zstd_ = info->compression == "zstd";
      if (!zstd_ && info->compression != "none")
        return End(name_ + ": compression " + info->compression + " is not one muster stores");
    } else if (hash_) {
      std::string got = nar::FormatSha256(hash_->Final());
      if (got != nar_hash_) return End(name_ + ": NarHash " + got + ", narinfo says " + nar_hash_);
      ++s_.verified;
    }
    NextObject();
  }

  void NextObject() {
    if (objects_.empty()) return End("");
    name_ = objects_.front();
    objects_.pop_front();
    is_narinfo_ = name_.size() > 8 && name_.substr(name_.size() - 8) == ".narinfo";
    text_.clear();
    hash_.reset();
    dctx_.reset();
    if (!is_narinfo_ && index_ == 0) {
      hash_ = std::make_unique<nar::Sha256>();
      if (zstd_) dctx_.reset(ZSTD_createDCtx());
    }
    received_ = requested_ = total_ = 0;
    in_flight_ = 0;
    Send();  // the first answer tells the size; then a window of requests
  }

  // Machine 0's check: hashes the NAR in the bytes (decompressed if need be).
  bool Verify(std::string_view bytes) {
    if (!dctx_) {
      hash_->Update(bytes);
      return true;
    }
    ZSTD_inBuffer in{bytes.data(), bytes.size(), 0};
    while (in.pos < in.size) {
      ZSTD_outBuffer out{zbuf_.data(), zbuf_.size(), 0};
      if (ZSTD_isError(ZSTD_decompressStream(dctx_.get(), &out, &in))) return false;
      hash_->Update(std::string_view(zbuf_.data(), out.pos));
    }
    return true;
  }

  void Pump() {
    while (in_flight_ < s_.o.window && requested_ < total_) Send();
  }

  void Send() {
    proto::Fetch f{next_id_++, name_, requested_, s_.o.chunk};
    requested_ += s_.o.chunk;
    ++in_flight_;
    client_->Send(proto::Encode(f));
  }

  void End(const std::string& why) {
    if (ended_) return;
    ended_ = true;
    s_.Finish(why.empty() ? "" : AgentName(index_) + ": " + why);
    client_->Close("done");
  }

  std::uint32_t index_;
  Shared& s_;
  std::shared_ptr<WsClient> client_;
  std::deque<std::string> objects_;
  std::string name_, text_, nar_hash_;
  bool zstd_ = false;  // of the NAR named by the last narinfo
  std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> dctx_{nullptr, ZSTD_freeDCtx};
  std::string zbuf_ = std::string(1 << 17, '\0');
  bool is_narinfo_ = false;
  std::unique_ptr<nar::Sha256> hash_;
  std::uint64_t received_ = 0, requested_ = 0, total_ = 0, next_id_ = 1;
  std::size_t in_flight_ = 0;
  bool ended_ = false;
};

}  // namespace

FetchResult FetchAll(const FetchOptions& o) {
  Shared s(o);
  boost::asio::io_context ioc;
  auto guard = boost::asio::make_work_guard(ioc);
  std::vector<std::shared_ptr<Machine>> machines;
  std::vector<std::thread> threads;
  for (int t = 0; t < std::max(1, o.threads); ++t) threads.emplace_back([&] { ioc.run(); });
  for (std::uint32_t i = 0; i < o.count; ++i) {
    machines.push_back(std::make_shared<Machine>(i, s));
    machines.back()->Start(ioc);
  }
  {
    std::unique_lock lock(s.mu);
    s.cv.wait_for(lock, o.timeout, [&] { return s.finished >= o.count; });
  }
  guard.reset();
  ioc.stop();
  for (auto& t : threads) t.join();
  FetchResult r;
  std::lock_guard lock(s.mu);
  r.start_ns = s.start_ns;
  r.end_ns = s.end_ns;
  r.bytes = s.bytes.load();
  r.done = s.done;
  r.verified = s.verified.load();
  r.error = s.error;
  if (r.error.empty() && s.finished < o.count) r.error = "timed out";
  return r;
}

}  // namespace muster::bench
