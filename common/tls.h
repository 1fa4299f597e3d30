// TLS 1.3 contexts with mutual authentication by pinned Ed25519 public keys.
//
// Each side presents a self-signed X.509 certificate made from its Ed25519 key.
// Chain validation is replaced by a key check: the client accepts exactly the
// pinned controller fingerprint (and, if a CA file is configured, a chain to
// that CA as an alternative); the server asks a callback whether the client's
// key is registered. TLS below 1.3 is refused by both sides.
#pragma once

#include <openssl/ssl.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/ssl/context.hpp>

#include "common/crypto.h"
#include "common/error.h"

namespace muster::tls {

// Returns true to accept a peer key; on refusal sets *reason for the log.
using KeyCheck = std::function<bool(const PublicKey& key, std::string* reason)>;

// PEM text of a self-signed certificate for key (valid 100 years, CN=common_name).
Result<std::string> MakeSelfSignedCertPem(const SecretKey& key, const std::string& common_name);

// A server context that presents cert_pem/key and admits clients whose key passes
// check. `check` must outlive the context. It is called on an I/O thread during
// the handshake and must be quick and thread-safe.
Result<std::shared_ptr<boost::asio::ssl::context>> MakeServerContext(const SecretKey& key,
                                                                     const std::string& cert_pem,
                                                                     const KeyCheck* check);

// A client context presenting a certificate for key and accepting only the
// server whose key fingerprint equals pin ("sha256:…").
Result<std::shared_ptr<boost::asio::ssl::context>> MakeClientContext(const SecretKey& key,
                                                                     const std::string& pin);

// The peer's Ed25519 key after a completed handshake.
std::optional<PublicKey> PeerKey(SSL* ssl);

// A short description of the last refusal recorded on this connection (or "").
std::string RefusalReason(SSL* ssl);

}  // namespace muster::tls
