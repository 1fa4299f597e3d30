#include "common/tls.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

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
  return holder;
}

std::optional<PublicKey> PeerKey(SSL* ssl) { return KeyOfCert(SSL_get0_peer_certificate(ssl)); }

std::string RefusalReason(SSL* ssl) {
  auto* r = static_cast<std::string*>(SSL_get_ex_data(ssl, ReasonIndex()));
  return r ? *r : std::string();
}

}  // namespace muster::tls
