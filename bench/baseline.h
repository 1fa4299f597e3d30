// The machine's own mTLS handshake rate: full TLS 1.3 handshakes with mutual
// Ed25519 certificate authentication, both ends in memory (BIO pairs), with the
// same contexts as the controller (tls::MakeServerContext and a key check that
// looks the client key up in a registry of `registry` keys) and as the load
// generator (one client context, per-connection certificate and key).
// No sockets, no websocket, no store: the cryptographic ceiling.
#pragma once

#include <cstdint>

namespace muster::bench {

struct BaselineResult {
  int threads = 0;
  double seconds = 0;
  std::uint64_t handshakes = 0;
  double per_second = 0;
};

// tickets >= 0 overrides the number of TLS 1.3 session tickets the server sends.
BaselineResult MeasureHandshakes(int threads, double seconds, std::uint32_t registry,
                                 int tickets = -1);

}  // namespace muster::bench
