#include "bench/sim.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <iostream>
#include <queue>
#include <random>

#include "agent/link.h"
#include "bench/keys.h"
#include "common/manifest.h"
#include "common/protocol.h"
#include "common/tls.h"

namespace muster::bench {

std::int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

namespace {

std::int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The phases a deploy that activates at once reports, in order.
constexpr const char* kPhases[] = {"received",    "verified",   "realising",  "vars-installed",
                                   "profile-set", "activating", "confirming", "succeeded"};

enum State : std::uint8_t {
  kIdle,        // not started
  kBackoff,     // waiting to reconnect
  kConnecting,  // TCP
  kTls,         // TLS handshake
  kUpgrade,     // websocket upgrade sent
  kHello,       // hello sent, waiting for welcome
  kOpen,        // welcomed
  kDead,        // stopped
};

enum TimerKind : std::uint8_t { kReconnect, kHandshakeTimeout, kPing };

struct Conn {
  int fd = -1;
  SSL* ssl = nullptr;
  std::string in;           // bytes received and not yet parsed (released when empty)
  std::string out;          // bytes waiting for the socket (released when empty)
  std::uint32_t epoch = 0;  // bumped on every (re)connection; stale timers compare it
  std::uint32_t last_rx_s = 0;
  State state = kIdle;
  std::uint8_t attempt = 0;
  bool counted_inflight = false;
  std::uint64_t next_seq = 1;
  std::uint64_t first_seq = 0;
  std::uint64_t final_seq = 0;
  std::int64_t final_generation = 0;
  std::int64_t last_applied = 0;
  std::int64_t queued_generation = 0;  // a deploy waiting in the deferred queue
};

struct Timer {
  std::int64_t when;
  std::uint32_t conn;
  std::uint32_t epoch;
  TimerKind kind;
  bool operator>(const Timer& o) const { return when > o.when; }
};

std::string SslErrorText() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

int ClientVerify(X509_STORE_CTX* ctx, void* arg) {
  const auto* pin = static_cast<const std::string*>(arg);
  X509* cert = X509_STORE_CTX_get0_cert(ctx);
  EVP_PKEY* pk = cert ? X509_get0_pubkey(cert) : nullptr;
  PublicKey key;
  size_t len = key.bytes.size();
  if (pk == nullptr || EVP_PKEY_get_id(pk) != EVP_PKEY_ED25519 ||
      EVP_PKEY_get_raw_public_key(pk, key.bytes.data(), &len) != 1 || len != 32 ||
      key.Fingerprint() != *pin) {
    X509_STORE_CTX_set_error(ctx, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  return 1;
}

}  // namespace

class Worker {
 public:
  Worker(Simulator& sim, int id) : sim_(sim), id_(id), rng_(0x5eed + static_cast<unsigned>(id)) {
    const auto& o = sim_.opts_;
    std::uint32_t t = static_cast<std::uint32_t>(o.threads);
    std::uint32_t local = o.count > static_cast<std::uint32_t>(id)
                              ? (o.count - static_cast<std::uint32_t>(id) + t - 1) / t
                              : 0;
    conns_.resize(local);
    der_.resize(local);
    max_inflight_ = std::max<std::uint32_t>(1, o.max_inflight / t);
    pin_ = o.pin;
    ctx_ = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx_, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx_, TLS1_3_VERSION);
    SSL_CTX_set_options(ctx_, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx_, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx_, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                               SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    SSL_CTX_set_cert_verify_callback(ctx_, ClientVerify, &pin_);
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    std::memset(&dst_, 0, sizeof dst_);
    dst_.sin_family = AF_INET;
    std::uint16_t port = (o.port2 != 0 && id % 2 == 1) ? o.port2 : o.port;
    dst_.sin_port = htons(port);
    inet_pton(AF_INET, o.host.c_str(), &dst_.sin_addr);
    host_header_ = o.host + ":" + std::to_string(port);
    start_ns_ = NowNs();
  }

  ~Worker() {
    for (auto& c : conns_) Release(c);
    if (ep_ >= 0) ::close(ep_);
    SSL_CTX_free(ctx_);
  }

  void Loop() {
    std::vector<epoll_event> evs(1024);
    while (!sim_.stop_.load(std::memory_order_relaxed)) {
      StartNew();
      int timeout = 50;
      if (!timers_.empty()) {
        std::int64_t ms = (timers_.top().when - NowNs()) / 1000000;
        timeout = static_cast<int>(std::clamp<std::int64_t>(ms, 0, 50));
      }
      if (!deferred_.empty()) timeout = 0;
      int n = epoll_wait(ep_, evs.data(), static_cast<int>(evs.size()), timeout);
      for (int k = 0; k < n; ++k)
        Drive(static_cast<std::uint32_t>(evs[static_cast<size_t>(k)].data.u64));
      RunTimers();
      // What arrived is read first; then a few deferred deploys (more when
      // nothing arrived) before looking again.
      RunDeferred(n == 0 ? 64 : 8);
    }
    for (auto& c : conns_) Release(c);
  }

 private:
  std::uint32_t Global(std::uint32_t j) const {
    return j * static_cast<std::uint32_t>(sim_.opts_.threads) + static_cast<std::uint32_t>(id_);
  }

  void StartNew() {
    std::uint32_t target = sim_.target_.load(std::memory_order_relaxed);
    while (started_ < conns_.size() && Global(started_) < target && inflight_ < max_inflight_) {
      Connect(started_++);
    }
  }

  void Release(Conn& c) {
    if (c.ssl) SSL_free(c.ssl);
    c.ssl = nullptr;
    if (c.fd >= 0) ::close(c.fd);
    c.fd = -1;
    std::string().swap(c.in);
    std::string().swap(c.out);
  }

  void AddTimer(std::int64_t when, std::uint32_t j, TimerKind kind) {
    timers_.push(Timer{when, j, conns_[j].epoch, kind});
  }

  void RunTimers() {
    std::int64_t now = NowNs();
    while (!timers_.empty() && timers_.top().when <= now) {
      Timer t = timers_.top();
      timers_.pop();
      Conn& c = conns_[t.conn];
      if (c.epoch != t.epoch) continue;
      switch (t.kind) {
        case kReconnect:
          if (c.state == kBackoff) Connect(t.conn);
          break;
        case kHandshakeTimeout:
          if (c.state >= kConnecting && c.state < kOpen) Fail(t.conn, "handshake timed out");
          break;
        case kPing:
          if (c.state != kOpen) break;
          if (NowS() - c.last_rx_s >= sim_.opts_.idle_timeout.count() / 1000) {
            Fail(t.conn, "idle timeout (nothing received from the controller)");
            break;
          }
          AppendFrame(c.out, 0x9, "");
          sim_.counters_.pings_sent++;
          if (Flush(t.conn))
            AddTimer(now + sim_.opts_.ping_interval.count() * 1000000, t.conn, kPing);
          break;
      }
    }
  }

  std::uint32_t NowS() const {
    return static_cast<std::uint32_t>((NowNs() - start_ns_) / 1000000000);
  }

  void Connect(std::uint32_t j) {
    Conn& c = conns_[j];
    std::uint32_t i = Global(j);
    ++c.epoch;
    c.state = kConnecting;
    c.counted_inflight = true;
    ++inflight_;
    sim_.counters_.connects++;
    AddTimer(NowNs() + sim_.opts_.handshake_timeout.count() * 1000000, j, kHandshakeTimeout);
    c.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd < 0) return Fail(j, std::string("socket: ") + std::strerror(errno));
    int one = 1;
    ::setsockopt(c.fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    ::setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sockaddr_in src{};
    src.sin_family = AF_INET;
    src.sin_addr.s_addr =
        htonl(0x7f000002u + i % static_cast<std::uint32_t>(sim_.opts_.source_addresses));
    if (::bind(c.fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
      return Fail(j, std::string("bind: ") + std::strerror(errno));
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP;
    ev.data.u64 = j;
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, c.fd, &ev) != 0) {
      return Fail(j, std::string("epoll_ctl: ") + std::strerror(errno));
    }
    if (::connect(c.fd, reinterpret_cast<sockaddr*>(&dst_), sizeof dst_) != 0 &&
        errno != EINPROGRESS) {
      return Fail(j, std::string("connect: ") + std::strerror(errno));
    }
  }

  // A certificate for agent i, made once and kept as DER.
  X509* CertFor(std::uint32_t j) {
    std::string& der = der_[j];
    if (der.empty()) {
      auto key = AgentKey(Global(j));
      auto pem = tls::MakeSelfSignedCertPem(key, "muster-client");
      if (!pem) return nullptr;
      BIO* bio = BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size()));
      X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
      BIO_free(bio);
      if (!x) return nullptr;
      unsigned char* out = nullptr;
      int len = i2d_X509(x, &out);
      der.assign(reinterpret_cast<char*>(out), static_cast<size_t>(len));
      OPENSSL_free(out);
      return x;
    }
    const auto* p = reinterpret_cast<const unsigned char*>(der.data());
    return d2i_X509(nullptr, &p, static_cast<long>(der.size()));
  }

  void Drive(std::uint32_t j) {
    Conn& c = conns_[j];
    if (c.state == kConnecting) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) return Fail(j, std::string("connect: ") + std::strerror(err));
      sockaddr_in peer{};
      socklen_t plen = sizeof peer;
      if (::getpeername(c.fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) return;  // not yet
      sim_.counters_.tcp_ok++;
      sim_.tcp_ns_[Global(j)].store(NowNs(), std::memory_order_relaxed);
      c.ssl = SSL_new(ctx_);
      SSL_set_fd(c.ssl, c.fd);
      SSL_set_connect_state(c.ssl);
      X509* cert = CertFor(j);
      std::string seed = AgentSeed(Global(j));
      EVP_PKEY* pk = EVP_PKEY_new_raw_private_key(
          EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(seed.data()),
          seed.size());
      bool ok =
          cert && pk && SSL_use_certificate(c.ssl, cert) == 1 && SSL_use_PrivateKey(c.ssl, pk) == 1;
      X509_free(cert);
      EVP_PKEY_free(pk);
      if (!ok) return Fail(j, "cannot load the agent certificate: " + SslErrorText());
      c.state = kTls;
    }
    if (c.state == kTls) {
      int r = SSL_do_handshake(c.ssl);
      if (r != 1) {
        int e = SSL_get_error(c.ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
        std::string why = SslErrorText();
        return Fail(j, "TLS handshake failed" + (why.empty() ? "" : ": " + why));
      }
      sim_.counters_.tls_ok++;
      SSL_certs_clear(c.ssl);  // TLS 1.3 without post-handshake auth needs them no more
      c.out = "GET /v1/agent HTTP/1.1\r\nHost: " + host_header_ +
              "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              "User-Agent: muster-loadgen\r\n\r\n";
      c.state = kUpgrade;
    }
    if (c.state < kUpgrade || c.state > kOpen) return;
    std::uint32_t epoch = c.epoch;
    if (!Flush(j)) return;
    char buf[16384];
    for (;;) {
      int r = SSL_read(c.ssl, buf, sizeof buf);
      if (r > 0) {
        c.last_rx_s = NowS();
        c.in.append(buf, static_cast<size_t>(r));
        Process(j);
        if (c.epoch != epoch || c.state > kOpen || c.state < kUpgrade) return;
        continue;
      }
      int e = SSL_get_error(c.ssl, r);
      if (e == SSL_ERROR_WANT_READ) break;
      if (e == SSL_ERROR_WANT_WRITE) break;
      if (e == SSL_ERROR_ZERO_RETURN)
        return Fail(j, "connection closed by the controller (TLS close)");
      std::string why = SslErrorText();
      if (why.empty()) why = errno != 0 ? std::strerror(errno) : "connection closed";
      return Fail(j, "read: " + why);
    }
    if (c.in.empty()) std::string().swap(c.in);
    Flush(j);
  }

  // Writes what is queued; false when the connection failed.
  bool Flush(std::uint32_t j) {
    Conn& c = conns_[j];
    while (!c.out.empty()) {
      int r = SSL_write(c.ssl, c.out.data(), static_cast<int>(c.out.size()));
      if (r > 0) {
        c.out.erase(0, static_cast<size_t>(r));
        continue;
      }
      int e = SSL_get_error(c.ssl, r);
      if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) return true;
      std::string why = SslErrorText();
      Fail(j, "write: " + (why.empty() ? std::string(std::strerror(errno)) : why));
      return false;
    }
    std::string().swap(c.out);
    return true;
  }

  // Client frames are masked (RFC 6455 5.3).
  void AppendFrame(std::string& out, int opcode, std::string_view payload) {
    out.push_back(static_cast<char>(0x80 | opcode));
    std::size_t n = payload.size();
    if (n < 126) {
      out.push_back(static_cast<char>(0x80 | n));
    } else if (n < 65536) {
      out.push_back(static_cast<char>(0x80 | 126));
      out.push_back(static_cast<char>(n >> 8));
      out.push_back(static_cast<char>(n & 0xff));
    } else {
      out.push_back(static_cast<char>(0x80 | 127));
      for (int s = 56; s >= 0; s -= 8) out.push_back(static_cast<char>((n >> s) & 0xff));
    }
    std::uint32_t m = static_cast<std::uint32_t>(rng_());
    char mask[4] = {static_cast<char>(m), static_cast<char>(m >> 8), static_cast<char>(m >> 16),
                    static_cast<char>(m >> 24)};
    out.append(mask, 4);
    std::size_t base = out.size();
    out.append(payload);
    for (std::size_t k = 0; k < n; ++k) out[base + k] ^= mask[k & 3];
  }

  void SendText(std::uint32_t j, const std::string& text) { AppendFrame(conns_[j].out, 0x1, text); }

  void Process(std::uint32_t j) {
    Conn& c = conns_[j];
    std::uint32_t epoch = c.epoch;
    if (c.state == kUpgrade) {
      auto end = c.in.find("\r\n\r\n");
      if (end == std::string::npos) {
        if (c.in.size() > 16384) Fail(j, "websocket upgrade response too long");
        return;
      }
      if (c.in.compare(0, 12, "HTTP/1.1 101") != 0) {
        return Fail(j, "websocket upgrade refused: " + c.in.substr(0, c.in.find("\r\n")));
      }
      c.in.erase(0, end + 4);
      c.state = kHello;
      proto::Hello h;
      h.machine = AgentName(Global(j));
      h.agent_version = "loadgen";
      h.facts = {"x86_64-linux", "nixos", "bench", h.machine, "6.1.0"};
      h.generation = c.last_applied;
      h.phase = c.last_applied > 0 ? "succeeded" : "idle";
      h.last_applied = c.last_applied;
      SendText(j, proto::Encode(h));
    }
    std::size_t pos = 0;
    while (c.in.size() - pos >= 2) {
      auto b0 = static_cast<unsigned char>(c.in[pos]);
      auto b1 = static_cast<unsigned char>(c.in[pos + 1]);
      std::size_t hdr = 2;
      std::uint64_t len = b1 & 0x7f;
      if (b1 & 0x80) return Fail(j, "controller sent a masked frame");
      if (len == 126) {
        if (c.in.size() - pos < 4) break;
        len = (static_cast<unsigned char>(c.in[pos + 2]) << 8) |
              static_cast<unsigned char>(c.in[pos + 3]);
        hdr = 4;
      } else if (len == 127) {
        if (c.in.size() - pos < 10) break;
        len = 0;
        for (int k = 0; k < 8; ++k)
          len = (len << 8) | static_cast<unsigned char>(c.in[pos + 2 + static_cast<size_t>(k)]);
        hdr = 10;
      }
      if (len > (8u << 20)) return Fail(j, "frame too large");
      if (c.in.size() - pos < hdr + len) break;
      std::string payload = c.in.substr(pos + hdr, static_cast<size_t>(len));
      pos += hdr + static_cast<size_t>(len);
      int op = b0 & 0x0f;
      if (!(b0 & 0x80) || op == 0x0)
        return Fail(j, "fragmented message (not expected from muster)");
      if (op == 0x9) {
        AppendFrame(c.out, 0xA, payload);
        sim_.counters_.pongs_sent++;
      } else if (op == 0xA) {
        // pong to our ping
      } else if (op == 0x8) {
        std::string reason = payload.size() > 2 ? payload.substr(2) : "";
        AppendFrame(c.out, 0x8, payload.substr(0, 2));
        if (!Flush(j)) return;
        return Fail(j, "closed by the controller" + (reason.empty() ? "" : ": " + reason));
      } else if (op == 0x1) {
        OnText(j, payload);
        if (c.epoch != epoch || c.state > kOpen) return;
      } else {
        return Fail(j, "unexpected websocket opcode " + std::to_string(op));
      }
    }
    c.in.erase(0, pos);
  }

  void OnText(std::uint32_t j, const std::string& text) {
    Conn& c = conns_[j];
    std::uint32_t i = Global(j);
    auto msg = proto::Decode(text);
    if (!msg) return Fail(j, "invalid message from the controller: " + msg.message());
    if (const auto* w = std::get_if<proto::Welcome>(&*msg)) {
      if (c.state != kHello) return Fail(j, "unexpected welcome");
      (void)w;
      c.state = kOpen;
      c.attempt = 0;  // the agent's ResetBackoff
      if (c.counted_inflight) {
        c.counted_inflight = false;
        --inflight_;
      }
      sim_.welcome_ns_[i].store(NowNs(), std::memory_order_relaxed);
      sim_.counters_.welcomes++;
      sim_.counters_.open++;
      AddTimer(NowNs() + sim_.opts_.ping_interval.count() * 1000000, j, kPing);
      return;
    }
    if (auto* d = std::get_if<proto::Deploy>(&*msg)) return OnDeploy(j, std::move(*d));
    if (const auto* a = std::get_if<proto::Ack>(&*msg)) {
      sim_.counters_.acks++;
      bool tracked = sim_.Tracked(c.final_generation);
      if (a->seq == c.first_seq && tracked)
        sim_.received_ack_ns_[i].store(NowNs(), std::memory_order_relaxed);
      if (a->seq == c.final_seq && c.final_seq != 0) {
        sim_.counters_.final_acks++;
        if (sim_.Tracked(c.final_generation)) {
          sim_.ack_ns_[i].store(NowNs(), std::memory_order_relaxed);
        }
      }
      return;
    }
    if (const auto* e = std::get_if<proto::ErrorMsg>(&*msg)) {
      return Fail(j, "controller error " + e->code + ": " + e->message);
    }
    Fail(j, "unexpected '" + std::string(proto::TypeName(*msg)) + "' from the controller");
  }

  struct Deferred {
    std::uint32_t conn;
    std::uint32_t epoch;
    std::int64_t generation;
    proto::Deploy deploy;
  };

  void RunDeferred(std::size_t most) {
    for (std::size_t k = 0; k < most && !deferred_.empty(); ++k) {
      Deferred d = std::move(deferred_.front());
      deferred_.pop_front();
      Conn& c = conns_[d.conn];
      if (c.queued_generation == d.generation) c.queued_generation = 0;
      if (c.epoch != d.epoch || c.state != kOpen) continue;  // connection lost meanwhile
      Apply(d.conn, d.deploy, d.generation);
      Flush(d.conn);
    }
  }

  void OnDeploy(std::uint32_t j, proto::Deploy d) {
    Conn& c = conns_[j];
    std::uint32_t i = Global(j);
    sim_.counters_.deploys++;
    auto peek = ParseManifest(d.manifest.manifest);
    std::int64_t gen = peek ? peek->generation : 0;
    if (gen != 0 && (gen == c.last_applied || gen == c.queued_generation)) return;  // in hand
    if (sim_.Tracked(gen) && sim_.notify_ns_[i].load(std::memory_order_relaxed) == 0) {
      sim_.notify_ns_[i].store(NowNs(), std::memory_order_relaxed);
    }
    if (sim_.opts_.defer_agent_work) {
      c.queued_generation = gen;
      deferred_.push_back(Deferred{j, c.epoch, gen, std::move(d)});
      return;
    }
    Apply(j, d, gen);
  }

  // What the agent does with a deploy: verify it, open its vars, report.
  void Apply(std::uint32_t j, const proto::Deploy& d, std::int64_t gen) {
    Conn& c = conns_[j];
    std::uint32_t i = Global(j);
    VerifyContext ctx;
    ctx.machine = AgentName(i);
    ctx.trusted_operators = {sim_.opts_.operator_key};
    ctx.last_applied = c.last_applied;
    auto send = [&](const char* phase, const std::string& detail, const std::string& toplevel,
                    bool facts) {
      proto::StatusReport r;
      r.seq = c.next_seq++;
      r.generation = gen;
      r.phase = phase;
      r.detail = detail;
      r.toplevel = toplevel;
      r.at = UnixMs();
      if (facts) r.facts = proto::HostFacts{"x86_64-linux", "nixos", "bench", ctx.machine, "6.1.0"};
      SendText(j, proto::Encode(r));
      sim_.counters_.reports++;
      return r.seq;
    };
    auto sealed = Base64Decode(d.vars);
    Result<Manifest> m = sealed ? VerifySignedManifest(d.manifest, ctx, *sealed)
                                : Result<Manifest>(Err("vars are not valid base64"));
    if (m && !sealed->empty()) {
      auto opened = AgentKey(i).OpenSealed(*sealed);
      if (!opened) m = Err("cannot open the vars: " + opened.message());
    }
    if (!m) {
      sim_.counters_.refused++;
      sim_.RecordFailure("deploy refused: " + m.message(), false);
      send("refused", m.message(), "", true);
      Flush(j);
      return;
    }
    sim_.counters_.verified++;
    c.last_applied = gen;
    sim_.applied_[i].store(gen, std::memory_order_relaxed);
    c.final_generation = gen;
    c.first_seq = c.next_seq;
    for (const char* phase : kPhases) {
      bool last = std::string_view(phase) == "succeeded";
      c.final_seq = send(phase, "", last ? m->toplevel : "", last);
    }
    if (sim_.Tracked(gen)) sim_.final_sent_ns_[i].store(NowNs(), std::memory_order_relaxed);
  }

  void Fail(std::uint32_t j, const std::string& reason) {
    Conn& c = conns_[j];
    bool expected = sim_.expect_disconnects_.load(std::memory_order_relaxed);
    if (c.state == kOpen) {
      sim_.counters_.open--;
      sim_.counters_.disconnects++;
    }
    if (c.counted_inflight) {
      c.counted_inflight = false;
      --inflight_;
    }
    sim_.RecordFailure(reason, expected);
    Release(c);
    ++c.epoch;
    if (sim_.stop_.load(std::memory_order_relaxed)) {
      c.state = kDead;
      return;
    }
    std::uniform_real_distribution<double> u(0.0, 1.0);
    auto delay = BackoffDelay(c.attempt, sim_.opts_.backoff_base, sim_.opts_.backoff_cap, u(rng_));
    if (c.attempt < 60) ++c.attempt;
    c.state = kBackoff;
    AddTimer(NowNs() + delay.count() * 1000000, j, kReconnect);
  }

  Simulator& sim_;
  int id_;
  std::mt19937_64 rng_;
  std::vector<Conn> conns_;
  std::vector<std::string> der_;
  std::priority_queue<Timer, std::vector<Timer>, std::greater<Timer>> timers_;
  std::deque<Deferred> deferred_;
  std::uint32_t started_ = 0;
  std::uint32_t inflight_ = 0;
  std::uint32_t max_inflight_ = 1;
  std::string pin_;
  SSL_CTX* ctx_ = nullptr;
  int ep_ = -1;
  sockaddr_in dst_{};
  std::string host_header_;
  std::int64_t start_ns_ = 0;
};

Simulator::Simulator(SimOptions options)
    : opts_(std::move(options)),
      welcome_ns_(opts_.count),
      tcp_ns_(opts_.count),
      notify_ns_(opts_.count),
      ack_ns_(opts_.count),
      received_ack_ns_(opts_.count),
      final_sent_ns_(opts_.count),
      applied_(opts_.count) {
  if (opts_.threads < 1) opts_.threads = 1;
}

Simulator::~Simulator() { Stop(); }

void Simulator::Start() {
  for (int t = 0; t < opts_.threads; ++t) workers_.push_back(std::make_unique<Worker>(*this, t));
  for (int t = 0; t < opts_.threads; ++t) {
    threads_.emplace_back([w = workers_[static_cast<size_t>(t)].get()] { w->Loop(); });
  }
}

void Simulator::SetTarget(std::uint32_t n) {
  std::uint32_t cur = target_.load();
  if (n > cur) target_.store(std::min(n, opts_.count));
}

void Simulator::Stop() {
  stop_ = true;
  for (auto& t : threads_) t.join();
  threads_.clear();
  workers_.clear();
}

void Simulator::RecordFailure(const std::string& reason, bool expected) {
  std::lock_guard lock(err_mu_);
  // Group by the text before any per-connection detail so the map stays small.
  std::string key = reason.substr(0, 160);
  if (expected) {
    ++expected_[key];
    return;
  }
  if (error_count_ < 10) std::cerr << "loadgen: " << reason << "\n";
  ++error_count_;
  ++errors_[key];
}

std::map<std::string, std::uint64_t> Simulator::Errors() const {
  std::lock_guard lock(err_mu_);
  return errors_;
}

std::map<std::string, std::uint64_t> Simulator::ExpectedFailures() const {
  std::lock_guard lock(err_mu_);
  return expected_;
}

std::uint64_t Simulator::ErrorCount() const {
  std::lock_guard lock(err_mu_);
  return error_count_;
}

}  // namespace muster::bench
