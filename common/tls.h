// TLS 1.3 contexts with mutual authentication by pinned Ed25519 public keys.
//
// Each side presents an X.509 certificate for its Ed25519 key, self-signed by
// default. Chain validation is replaced by a key check: the client accepts
// exactly the pinned controller fingerprint; the server asks a callback whether
// the client's key is registered. A client may in addition be given a CA file:
// then the controller's certificate must also chain to one of its CAs (pin AND
// chain; the CA never replaces the pin). The controller's certificate file may
// then hold its CA-issued certificate followed by intermediates (see
// MakeCertificateRequestPem). TLS below 1.3 is refused by both sides.
#pragma once

#include <openssl/ssl.h>

#include <boost/asio/ssl/context.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "common/crypto.h"
#include "common/error.h"

namespace muster::tls {

// Returns true to accept a peer key; on refusal sets *reason for the log.
using KeyCheck = std::function<bool(const PublicKey& key, std::string* reason)>;

// PEM text of a self-signed certificate for key (valid 100 years, CN=common_name).
Result<std::string> MakeSelfSignedCertPem(const SecretKey& key, const std::string& common_name);

// PEM text of a certificate signing request for key (CN=common_name), for a CA
// to issue the controller's certificate from.
Result<std::string> MakeCertificateRequestPem(const SecretKey& key, const std::string& common_name);

// A server context that presents cert_pem (the certificate for key, then any
// intermediate certificates) and admits clients whose key passes check. `check` must outlive the
// context. It is called on an I/O thread during the handshake and must be quick and thread-safe.
Result<std::shared_ptr<boost::asio::ssl::context>> MakeServerContext(const SecretKey& key,
                                                                     const std::string& cert_pem,
                                                                     const KeyCheck* check);

// A client context presenting a certificate for key and accepting only the
// server whose key fingerprint equals pin ("sha256:…") and, when ca_file (PEM,
// one or more CA certificates) is given, whose certificate chains to one of
// those CAs. Fails when ca_file cannot be read or holds no certificate.
Result<std::shared_ptr<boost::asio::ssl::context>> MakeClientContext(
    const SecretKey& key, const std::string& pin, const std::string& ca_file = "");

// The peer's Ed25519 key after a completed handshake.
std::optional<PublicKey> PeerKey(SSL* ssl);

// A short description of the last refusal recorded on this connection (or "").
std::string RefusalReason(SSL* ssl);

}  // namespace muster::tls
