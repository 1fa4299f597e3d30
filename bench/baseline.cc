#include "bench/baseline.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bench/keys.h"
#include "bench/sim.h"
#include "common/tls.h"

namespace muster::bench {

namespace {

int AcceptPinned(X509_STORE_CTX*, void*) { return 1; }  // the pin check costs ~nothing

struct ClientId {
  std::string der;
  std::string seed;
};

std::uint64_t Loop(SSL_CTX* server, SSL_CTX* client, const std::vector<ClientId>& ids,
                   std::int64_t until_ns) {
  std::uint64_t n = 0;
  char buf[256];
  while (NowNs() < until_ns) {
    const ClientId& id = ids[n % ids.size()];
    SSL* s = SSL_new(server);
    SSL* c = SSL_new(client);
    BIO *bs = nullptr, *bc = nullptr;
    BIO_new_bio_pair(&bs, 0, &bc, 0);
    SSL_set_bio(s, bs, bs);
    SSL_set_bio(c, bc, bc);
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    const auto* p = reinterpret_cast<const unsigned char*>(id.der.data());
    X509* cert = d2i_X509(nullptr, &p, static_cast<long>(id.der.size()));
    EVP_PKEY* pk = EVP_PKEY_new_raw_private_key(
        EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(id.seed.data()), 32);
    SSL_use_certificate(c, cert);
    SSL_use_PrivateKey(c, pk);
    X509_free(cert);
    EVP_PKEY_free(pk);
    bool cdone = false, sdone = false;
    for (int round = 0; round < 20 && !(cdone && sdone); ++round) {
      if (!cdone) cdone = SSL_do_handshake(c) == 1;
      if (!sdone) sdone = SSL_do_handshake(s) == 1;
    }
    if (!(cdone && sdone)) throw std::runtime_error("baseline handshake failed");
    (void)SSL_read(c, buf, sizeof buf);  // consume what the server sent after its Finished
    SSL_free(s);
    SSL_free(c);
    ++n;
  }
  return n;
}

}  // namespace

BaselineResult MeasureHandshakes(int threads, double seconds, std::uint32_t registry, int tickets) {
  // Server: the controller's context, with the controller's kind of key check.
  SecretKey server_key = OperatorKey();  // any Ed25519 key will do
  auto pem = tls::MakeSelfSignedCertPem(server_key, "muster-controller");
  std::map<std::string, int> keys;
  std::mutex mu;
  for (std::uint32_t i = 0; i < registry; ++i) keys[AgentKey(i).public_key().ToText()] = 1;
  tls::KeyCheck check = [&](const PublicKey& k, std::string*) {
    std::lock_guard lock(mu);
    return keys.count(k.ToText()) > 0;
  };
  auto sctx = tls::MakeServerContext(server_key, *pem, &check);
  if (tickets >= 0) SSL_CTX_set_num_tickets((*sctx)->native_handle(), static_cast<size_t>(tickets));
  // Client: as the load generator builds it.
  SSL_CTX* cctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(cctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(cctx, TLS1_3_VERSION);
  SSL_CTX_set_options(cctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(cctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_mode(cctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_cert_verify_callback(cctx, AcceptPinned, nullptr);
  std::vector<ClientId> ids;
  for (std::uint32_t i = 0; i < std::min<std::uint32_t>(registry, 256); ++i) {
    auto cpem = tls::MakeSelfSignedCertPem(AgentKey(i), "muster-client");
    BIO* bio = BIO_new_mem_buf(cpem->data(), static_cast<int>(cpem->size()));
    X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    unsigned char* out = nullptr;
    int len = i2d_X509(x, &out);
    ids.push_back(
        {std::string(reinterpret_cast<char*>(out), static_cast<size_t>(len)), AgentSeed(i)});
    OPENSSL_free(out);
    X509_free(x);
  }
  std::int64_t start = NowNs();
  std::int64_t until = start + static_cast<std::int64_t>(seconds * 1e9);
  std::atomic<std::uint64_t> total{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&] { total += Loop((*sctx)->native_handle(), cctx, ids, until); });
  }
  for (auto& t : ts) t.join();
  double elapsed = static_cast<double>(NowNs() - start) / 1e9;
  SSL_CTX_free(cctx);
  return {threads, elapsed, total.load(), static_cast<double>(total.load()) / elapsed};
}

}  // namespace muster::bench
