#include "common/tls.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>
#include <string>

#include "common/testutil.h"

namespace muster {
namespace {

using ::testing::HasSubstr;
using testing::Spit;
using testing::TempDir;

struct X509Free {
  void operator()(X509* p) const { X509_free(p); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

PkeyPtr Evp(const SecretKey& k) {
  return PkeyPtr(EVP_PKEY_new_raw_private_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(k.seed().data()),
      k.seed().size()));
}

void AddExt(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, nid, value);
  ASSERT_NE(ext, nullptr);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

// A certificate for subject_key named cn, issued by issuer (its key and
// certificate; nullptr: self-signed), a CA when is_ca.
X509Ptr Issue(EVP_PKEY* subject_key, const std::string& cn, EVP_PKEY* issuer_key, X509* issuer,
              bool is_ca) {
  X509Ptr x(X509_new());
  X509_set_version(x.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x.get()), 7);
  X509_gmtime_adj(X509_getm_notBefore(x.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x.get()), 3600);
  X509_set_pubkey(x.get(), subject_key);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(x.get()), "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x.get(),
                       issuer ? X509_get_subject_name(issuer) : X509_get_subject_name(x.get()));
  AddExt(x.get(), issuer ? issuer : x.get(), NID_basic_constraints,
         is_ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  if (is_ca) AddExt(x.get(), issuer ? issuer : x.get(), NID_key_usage, "critical,keyCertSign");
  EXPECT_GT(X509_sign(x.get(), issuer_key, nullptr), 0);
  return x;
}

std::string Pem(X509* x) {
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(bio, x);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(len));
  BIO_free(bio);
  return out;
}

// The subject key of a PEM certificate request made by MakeCertificateRequestPem.
PkeyPtr KeyOfRequest(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509_REQ* req = PEM_read_bio_X509_REQ(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (req == nullptr) return nullptr;
  EXPECT_EQ(X509_REQ_verify(req, X509_REQ_get0_pubkey(req)), 1) << "self-signed request";
  PkeyPtr key(X509_REQ_get_pubkey(req));
  X509_REQ_free(req);
  return key;
}

// Runs a TLS handshake between the two contexts over an in-memory pipe.
// Returns whether both sides completed; *client_reason is the client's refusal.
bool Handshake(boost::asio::ssl::context& server, boost::asio::ssl::context& client,
               std::string* client_reason) {
  SSL* s = SSL_new(server.native_handle());
  SSL* c = SSL_new(client.native_handle());
  BIO* bs = nullptr;
  BIO* bc = nullptr;
  BIO_new_bio_pair(&bs, 0, &bc, 0);
  SSL_set_bio(s, bs, bs);
  SSL_set_bio(c, bc, bc);
  SSL_set_accept_state(s);
  SSL_set_connect_state(c);
  bool done = false, failed = false;
  for (int i = 0; i < 50 && !done && !failed; ++i) {
    int rc = SSL_do_handshake(c);
    int rs = SSL_do_handshake(s);
    auto stuck = [](SSL* ssl, int r) {
      int e = SSL_get_error(ssl, r);
      return r != 1 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE;
    };
    failed = stuck(c, rc) || stuck(s, rs);
    done = rc == 1 && rs == 1;
  }
  // TLS 1.3: the server checks the client's certificate after the client is
  // done; one more read lets a refusal by either side surface.
  char byte;
  if (done && SSL_read(c, &byte, 1) <= 0) {
    int e = SSL_get_error(c, -1);
    if (e != SSL_ERROR_WANT_READ) done = false;
  }
  *client_reason = tls::RefusalReason(c);
  SSL_free(c);
  SSL_free(s);
  ERR_clear_error();
  return done && !failed;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    InitCrypto();
    accept_all_ = [](const PublicKey&, std::string*) { return true; };
    root_ = Issue(root_key_.get(), "test root", root_key_.get(), nullptr, true);
    inter_ = Issue(inter_key_.get(), "test intermediate", root_key_.get(), root_.get(), true);
    Spit(dir_ / "ca.pem", Pem(root_.get()));
  }

  // The controller's certificate issued by the intermediate, from a request.
  std::string IssuedChain(const SecretKey& key) {
    auto csr = tls::MakeCertificateRequestPem(key, "muster-controller");
    EXPECT_TRUE(csr.ok()) << csr.message();
    PkeyPtr subject = KeyOfRequest(*csr);
    EXPECT_NE(subject, nullptr);
    X509Ptr leaf = Issue(subject.get(), "muster-controller", inter_key_.get(), inter_.get(), false);
    return Pem(leaf.get()) + Pem(inter_.get());
  }

  std::shared_ptr<boost::asio::ssl::context> Server(const std::string& cert_pem) {
    auto ctx = tls::MakeServerContext(controller_, cert_pem, &accept_all_);
    EXPECT_TRUE(ctx.ok()) << ctx.message();
    return *ctx;
  }

  std::shared_ptr<boost::asio::ssl::context> Client(const std::string& ca_file) {
    auto ctx = tls::MakeClientContext(agent_, controller_.public_key().Fingerprint(), ca_file);
    EXPECT_TRUE(ctx.ok()) << ctx.message();
    return *ctx;
  }

  TempDir dir_;
  tls::KeyCheck accept_all_;
  SecretKey controller_ = SecretKey::FromSeed(std::string(32, 'c')).value();
  SecretKey agent_ = SecretKey::FromSeed(std::string(32, 'a')).value();
  PkeyPtr root_key_ = Evp(SecretKey::FromSeed(std::string(32, 'r')).value());
  PkeyPtr inter_key_ = Evp(SecretKey::FromSeed(std::string(32, 'i')).value());
  X509Ptr root_, inter_;
};

TEST_F(TlsTest, PinAloneAcceptsTheSelfSignedCertificate) {
  auto self_signed = tls::MakeSelfSignedCertPem(controller_, "muster-controller");
  ASSERT_TRUE(self_signed.ok());
  std::string why;
  EXPECT_TRUE(Handshake(*Server(*self_signed), *Client(""), &why)) << why;
  EXPECT_TRUE(Handshake(*Server(IssuedChain(controller_)), *Client(""), &why)) << why;
}

TEST_F(TlsTest, WithACaFileTheCertificateMustChainToIt) {
  auto self_signed = tls::MakeSelfSignedCertPem(controller_, "muster-controller");
  ASSERT_TRUE(self_signed.ok());
  std::string why;
  EXPECT_FALSE(Handshake(*Server(*self_signed), *Client((dir_ / "ca.pem").string()), &why));
  EXPECT_THAT(why, HasSubstr("controller certificate does not chain to a CA in " +
                             (dir_ / "ca.pem").string()));
  EXPECT_THAT(why, HasSubstr("or remove controllerCaFile"));
  // Issued by the CA (through an intermediate sent with it): accepted.
  EXPECT_TRUE(
      Handshake(*Server(IssuedChain(controller_)), *Client((dir_ / "ca.pem").string()), &why))
      << why;
}

TEST_F(TlsTest, WithACaFileThePinStillMustMatch) {
  // A certificate the CA issued for another key is refused: the CA adds to the
  // pin, it never replaces it.
  SecretKey impostor = SecretKey::FromSeed(std::string(32, 'x')).value();
  auto ctx = tls::MakeServerContext(impostor, IssuedChain(impostor), &accept_all_);
  ASSERT_TRUE(ctx.ok()) << ctx.message();
  std::string why;
  EXPECT_FALSE(Handshake(**ctx, *Client((dir_ / "ca.pem").string()), &why));
  EXPECT_THAT(why, HasSubstr("does not match the pinned"));
}

TEST_F(TlsTest, AnUnreadableCaFileIsAClearError) {
  auto missing = tls::MakeClientContext(agent_, controller_.public_key().Fingerprint(),
                                        (dir_ / "missing.pem").string());
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.message(),
              HasSubstr("cannot load the CA file " + (dir_ / "missing.pem").string() +
                        " (controllerCaFile)"));
  Spit(dir_ / "junk.pem", "not a certificate\n");
  auto junk = tls::MakeClientContext(agent_, controller_.public_key().Fingerprint(),
                                     (dir_ / "junk.pem").string());
  ASSERT_FALSE(junk.ok());
  EXPECT_THAT(junk.message(), HasSubstr("it must hold PEM certificates"));
}

}  // namespace
}  // namespace muster
