#include "common/tls.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>

namespace muster::tls {

namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Free {
  void operator()(X509* p) const { X509_free(p); }
};
struct BioFree {
  void operator()(BIO* p) const { BIO_free(p); }
};

std::string OpenSslError() {
  unsigned long e = ERR_get_error();
  if (e == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

std::unique_ptr<EVP_PKEY, PkeyFree> ToEvp(const SecretKey& key) {
  return std::unique_ptr<EVP_PKEY, PkeyFree>(EVP_PKEY_new_raw_private_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(key.seed().data()),
      key.seed().size()));
}

std::optional<PublicKey> KeyOfCert(X509* cert) {
  if (cert == nullptr) return std::nullopt;
  EVP_PKEY* pk = X509_get0_pubkey(cert);
  if (pk == nullptr || EVP_PKEY_get_id(pk) != EVP_PKEY_ED25519) return std::nullopt;
  PublicKey out;
  size_t len = out.bytes.size();
  if (EVP_PKEY_get_raw_public_key(pk, out.bytes.data(), &len) != 1 || len != 32) {
    return std::nullopt;
  }
  return out;
}

// Per-connection refusal reason, kept on the SSL object for logging.
int ReasonIndex() {
  static int idx = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr,
                                        [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
                                          delete static_cast<std::string*>(ptr);
                                        });
  return idx;
}

void SetReason(SSL* ssl, std::string reason) {
  if (ssl == nullptr) return;
  auto* old = static_cast<std::string*>(SSL_get_ex_data(ssl, ReasonIndex()));
  delete old;
  SSL_set_ex_data(ssl, ReasonIndex(), new std::string(std::move(reason)));
}

SSL* SslOf(X509_STORE_CTX* ctx) {
  return static_cast<SSL*>(X509_STORE_CTX_get_ex_data(ctx, SSL_get_ex_data_X509_STORE_CTX_idx()));
}

int ServerVerify(X509_STORE_CTX* ctx, void* arg) {
  const auto* check = static_cast<const KeyCheck*>(arg);
  auto key = KeyOfCert(X509_STORE_CTX_get0_cert(ctx));
  if (!key) {
    SetReason(SslOf(ctx), "client certificate does not carry an Ed25519 key");
    X509_STORE_CTX_set_error(ctx, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  std::string reason;
  if (check == nullptr || !(*check)(*key, &reason)) {
    SetReason(SslOf(ctx), reason.empty() ? "key " + key->ToText() + " is not registered" : reason);
    X509_STORE_CTX_set_error(ctx, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  return 1;
}

// What a client checks about the controller's certificate.
struct ClientCheck {
  std::string pin;
  std::string ca_file;  // "" = pin only
};

int ClientVerify(X509_STORE_CTX* ctx, void* arg) {
  const auto* check = static_cast<const ClientCheck*>(arg);
  const std::string* pin = &check->pin;
  auto key = KeyOfCert(X509_STORE_CTX_get0_cert(ctx));
  if (!key) {
    SetReason(SslOf(ctx), "controller certificate does not carry an Ed25519 key");
    X509_STORE_CTX_set_error(ctx, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  if (key->Fingerprint() != *pin) {
    SetReason(SslOf(ctx), "controller key fingerprint " + key->Fingerprint() +
                              " does not match the pinned " + *pin +
                              "; check the pin printed by 'muster-controller init'");
    X509_STORE_CTX_set_error(ctx, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  // The pin matched; with a CA file the chain must verify too (OpenSSL's own
  // path building, validity and purpose checks against the CA file's store).
  if (!check->ca_file.empty() && X509_verify_cert(ctx) != 1) {
    int err = X509_STORE_CTX_get_error(ctx);
    SetReason(SslOf(ctx), "controller certificate does not chain to a CA in " + check->ca_file +
                              " (" + X509_verify_cert_error_string(err) +
                              "); install a certificate for the controller key issued by that "
                              "CA as controller.crt (see 'muster-controller csr'), or remove "
                              "controllerCaFile");
    return 0;
  }
  return 1;
}

Status UseKeyAndCert(SSL_CTX* ctx, const SecretKey& key, const std::string& cert_pem) {
  auto pkey = ToEvp(key);
  if (!pkey) return Err("cannot load Ed25519 key into OpenSSL: " + OpenSslError());
  std::unique_ptr<BIO, BioFree> bio(
      BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
  std::unique_ptr<X509, X509Free> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return Err("cannot parse certificate: " + OpenSslError());
  if (SSL_CTX_use_certificate(ctx, cert.get()) != 1 ||
      SSL_CTX_use_PrivateKey(ctx, pkey.get()) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
    return Err("certificate does not match the key: " + OpenSslError());
  }
  // Any further certificates are the chain (intermediates) sent with it.
  while (std::unique_ptr<X509, X509Free> extra{
      PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)}) {
    if (SSL_CTX_add1_chain_cert(ctx, extra.get()) != 1) {
      return Err("cannot use the chain certificate: " + OpenSslError());
    }
  }
  ERR_clear_error();  // reaching the end of the PEM text is recorded as an error
  return Status::Ok();
}

// Session tickets (TLS 1.3 resumption), so that a fleet reconnecting after a
// controller restart re-authenticates without a full handshake.
//
// The ticket keys are derived from the controller's own secret key and a
// 12-hour epoch, never stored: a restarted controller (or another controller
// sharing its key) accepts the tickets it issued, and rotating the controller
// key voids every ticket. A ticket is honoured for at most kTicketSeconds, and
// only with a fresh (EC)DHE exchange (OpenSSL refuses psk_ke unless told
// otherwise), so resumed sessions keep forward secrecy. The server's identity
// check does not rest on the ticket alone: the controller looks the peer key
// up after every handshake, resumed or not (a revoked machine is refused).
constexpr long kTicketSeconds = 12 * 3600;

struct TicketKeys {
  unsigned char name[16];
  unsigned char aes[32];
  unsigned char hmac[32];
};

struct TicketSecret {
  std::array<unsigned char, 32> seed{};
};

TicketKeys DeriveTicketKeys(const TicketSecret& secret, std::uint64_t epoch) {
  TicketKeys k{};
  auto derive = [&](const char* what, unsigned char* out, std::size_t n) {
    std::string msg = std::string("muster-ticket-v1 ") + what + " " + std::to_string(epoch);
    crypto_generichash(out, n, reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
                       secret.seed.data(), secret.seed.size());
  };
  derive("name", k.name, sizeof k.name);
  derive("aes", k.aes, sizeof k.aes);
  derive("hmac", k.hmac, sizeof k.hmac);
  return k;
}

int TicketSecretIndex() {
  static int idx = SSL_CTX_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        if (ptr != nullptr) {
          sodium_memzero(ptr, sizeof(TicketSecret));
          delete static_cast<TicketSecret*>(ptr);
        }
      });
  return idx;
}

int TicketKeyCallback(SSL* ssl, unsigned char key_name[16], unsigned char* iv,
                      EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc) {
  const auto* secret = static_cast<const TicketSecret*>(
      SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), TicketSecretIndex()));
  if (secret == nullptr) return 0;
  const std::uint64_t epoch = static_cast<std::uint64_t>(std::time(nullptr)) / kTicketSeconds;
  auto use = [&](const TicketKeys& k, int ok) {
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, const_cast<unsigned char*>(k.hmac),
                                          sizeof k.hmac),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0), OSSL_PARAM_END};
    if (EVP_MAC_CTX_set_params(mac, params) != 1) return -1;
    if (enc) {
      if (EVP_EncryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, k.aes, iv) != 1) return -1;
    } else if (EVP_DecryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, k.aes, iv) != 1) {
      return -1;
    }
    return ok;
  };
  if (enc) {
    TicketKeys k = DeriveTicketKeys(*secret, epoch);
    std::memcpy(key_name, k.name, sizeof k.name);
    randombytes_buf(iv, 16);  // AES-256-CBC's IV length
    int r = use(k, 1);
    sodium_memzero(&k, sizeof k);
    return r;
  }
  for (std::uint64_t e : {epoch, epoch - 1}) {
    TicketKeys k = DeriveTicketKeys(*secret, e);
    bool match = std::memcmp(key_name, k.name, sizeof k.name) == 0;
    // A ticket of the previous epoch is honoured once more and replaced (2).
    int r = match ? use(k, e == epoch ? 1 : 2) : 0;
    sodium_memzero(&k, sizeof k);
    if (match) return r;
  }
  return 0;  // unknown key (another controller key, an old epoch): full handshake
}

// A ticket is used only while the key it was issued to is still admitted;
// otherwise the ticket is ignored and the full handshake's key check refuses
// the key as it would without a ticket (same alert, same log line).
SSL_TICKET_RETURN TicketDecrypted(SSL* ssl, SSL_SESSION* session, const unsigned char*, size_t,
                                  SSL_TICKET_STATUS status, void* arg) {
  switch (status) {
    case SSL_TICKET_SUCCESS:
    case SSL_TICKET_SUCCESS_RENEW: {
      const auto* check = static_cast<const KeyCheck*>(arg);
      auto key = KeyOfCert(SSL_SESSION_get0_peer(session));
      std::string reason;
      if (!key || check == nullptr || !(*check)(*key, &reason))
        return SSL_TICKET_RETURN_IGNORE_RENEW;
      (void)ssl;
      return status == SSL_TICKET_SUCCESS ? SSL_TICKET_RETURN_USE : SSL_TICKET_RETURN_USE_RENEW;
    }
    case SSL_TICKET_FATAL_ERR_MALLOC:
    case SSL_TICKET_FATAL_ERR_OTHER:
      return SSL_TICKET_RETURN_ABORT;
    default:  // none, empty, not ours: a full handshake
      return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
}

// A client context's tickets, one per controller URL, kept in memory only.
struct TicketJar {
  std::mutex mu;
  std::map<std::string, SSL_SESSION*> sessions;
  ~TicketJar() {
    for (auto& [peer, s] : sessions) SSL_SESSION_free(s);
  }
};

int JarIndex() {
  static int idx = SSL_CTX_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<TicketJar*>(ptr);
      });
  return idx;
}

int PeerNameIndex() {
  static int idx = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr,
                                        [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
                                          delete static_cast<std::string*>(ptr);
                                        });
  return idx;
}

int NewSessionCallback(SSL* ssl, SSL_SESSION* session) {
  auto* jar = static_cast<TicketJar*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), JarIndex()));
  auto* peer = static_cast<std::string*>(SSL_get_ex_data(ssl, PeerNameIndex()));
  if (jar == nullptr || peer == nullptr || !SSL_SESSION_is_resumable(session)) return 0;
  // A copy: the connection's own session is marked not resumable when the
  // connection ends without a close_notify (a controller that died), which is
  // exactly when the ticket is wanted.
  SSL_SESSION* copy = SSL_SESSION_dup(session);
  if (copy == nullptr) return 0;
  std::lock_guard lock(jar->mu);
  SSL_SESSION*& slot = jar->sessions[*peer];
  if (slot != nullptr) SSL_SESSION_free(slot);
  slot = copy;
  return 0;  // the connection keeps its own
}

void CommonSettings(SSL_CTX* ctx) {
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 0);  // nothing resumes sessions: send no TLS 1.3 tickets
  // Smaller per-connection buffers: muster frames are small.
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
}

}  // namespace

Result<std::string> MakeSelfSignedCertPem(const SecretKey& key, const std::string& common_name) {
  auto pkey = ToEvp(key);
  if (!pkey) return Err("cannot load Ed25519 key into OpenSSL: " + OpenSslError());
  std::unique_ptr<X509, X509Free> x(X509_new());
  X509_set_version(x.get(), 2);
  unsigned char serial[16];
  for (size_t i = 0; i < sizeof serial; ++i)
    serial[i] = static_cast<unsigned char>(key.public_key().bytes[i]);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(x.get()), -24 * 3600);
  X509_time_adj_ex(X509_getm_notAfter(x.get()), 36500, 0, nullptr);
  X509_set_pubkey(x.get(), pkey.get());
  X509_NAME* name = X509_get_subject_name(x.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  X509_set_issuer_name(x.get(), name);
  if (X509_sign(x.get(), pkey.get(), nullptr) <= 0) {
    return Err("cannot sign certificate: " + OpenSslError());
  }
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), x.get());
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

Result<std::string> MakeCertificateRequestPem(const SecretKey& key,
                                              const std::string& common_name) {
  auto pkey = ToEvp(key);
  if (!pkey) return Err("cannot load Ed25519 key into OpenSSL: " + OpenSslError());
  struct ReqFree {
    void operator()(X509_REQ* p) const { X509_REQ_free(p); }
  };
  std::unique_ptr<X509_REQ, ReqFree> req(X509_REQ_new());
  X509_REQ_set_version(req.get(), 0);
  X509_NAME* name = X509_REQ_get_subject_name(req.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  X509_REQ_set_pubkey(req.get(), pkey.get());
  if (X509_REQ_sign(req.get(), pkey.get(), nullptr) <= 0) {
    return Err("cannot sign the certificate request: " + OpenSslError());
  }
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509_REQ(bio.get(), req.get());
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

Result<std::shared_ptr<boost::asio::ssl::context>> MakeServerContext(const SecretKey& key,
                                                                     const std::string& cert_pem,
                                                                     const KeyCheck* check) {
  auto ctx = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
  SSL_CTX* c = ctx->native_handle();
  CommonSettings(c);
  if (auto st = UseKeyAndCert(c, key, cert_pem); !st) return st.error();
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  SSL_CTX_set_cert_verify_callback(c, ServerVerify, const_cast<KeyCheck*>(check));
  // Stateless tickets: one per full handshake and per resumption.
  auto* secret = new TicketSecret;
  std::memcpy(secret->seed.data(), key.seed().data(), secret->seed.size());
  SSL_CTX_set_ex_data(c, TicketSecretIndex(), secret);
  SSL_CTX_clear_options(c, SSL_OP_NO_TICKET);
  SSL_CTX_set_num_tickets(c, 1);
  SSL_CTX_set_timeout(c, kTicketSeconds);
  SSL_CTX_set_tlsext_ticket_key_evp_cb(c, TicketKeyCallback);
  SSL_CTX_set_session_ticket_cb(c, nullptr, TicketDecrypted, const_cast<KeyCheck*>(check));
  // The session id context a resumed session must match: this controller's key.
  auto id = key.public_key().ShortId();
  SSL_CTX_set_session_id_context(c, reinterpret_cast<const unsigned char*>(id.data()),
                                 static_cast<unsigned int>(std::min<std::size_t>(id.size(), 32)));
  return ctx;
}

Result<std::shared_ptr<boost::asio::ssl::context>> MakeClientContext(const SecretKey& key,
                                                                     const std::string& pin,
                                                                     const std::string& ca_file) {
  auto fp = ParseFingerprint(pin);
  if (!fp) return fp.error();
  auto cert = MakeSelfSignedCertPem(key, "muster-client");
  if (!cert) return cert.error();
  auto ctx = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_client);
  SSL_CTX* c = ctx->native_handle();
  CommonSettings(c);
  if (auto st = UseKeyAndCert(c, key, *cert); !st) return st.error();
  if (!ca_file.empty() && SSL_CTX_load_verify_locations(c, ca_file.c_str(), nullptr) != 1) {
    return Err("cannot load the CA file " + ca_file + " (controllerCaFile): " + OpenSslError() +
               "; it must hold PEM certificates");
  }
  // The check lives as long as the context: a holder owned by the shared_ptr's
  // deleter chain.
  auto* check = new ClientCheck{*fp, ca_file};
  auto holder = std::shared_ptr<boost::asio::ssl::context>(
      ctx.get(), [ctx, check](boost::asio::ssl::context*) mutable {
        ctx.reset();
        delete check;
      });
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_cert_verify_callback(c, ClientVerify, check);
  // Keep the tickets the controller sends (OfferSession uses them).
  SSL_CTX_set_ex_data(c, JarIndex(), new TicketJar);
  SSL_CTX_clear_options(c, SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(c, NewSessionCallback);
  return holder;
}

void OfferSession(SSL* ssl, const std::string& peer) {
  SSL_set_ex_data(ssl, PeerNameIndex(), new std::string(peer));
  auto* jar = static_cast<TicketJar*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), JarIndex()));
  if (jar == nullptr) return;
  std::lock_guard lock(jar->mu);
  auto it = jar->sessions.find(peer);
  if (it == jar->sessions.end()) return;
  // Kept until a newer one arrives: a connection that fails before its
  // handshake ends can offer it again (no early data is ever sent, so a
  // ticket used twice replays nothing). The connection gets a copy, which
  // its failure may mark not resumable; the jar's stays good.
  SSL_SESSION* copy = SSL_SESSION_dup(it->second);
  if (copy == nullptr) return;
  SSL_set_session(ssl, copy);
  SSL_SESSION_free(copy);
}

bool Resumed(SSL* ssl) { return SSL_session_reused(ssl) == 1; }

std::optional<PublicKey> PeerKey(SSL* ssl) { return KeyOfCert(SSL_get0_peer_certificate(ssl)); }

std::string RefusalReason(SSL* ssl) {
  auto* r = static_cast<std::string*>(SSL_get_ex_data(ssl, ReasonIndex()));
  return r ? *r : std::string();
}

}  // namespace muster::tls
