// The controller's binary cache, served to nix on loopback for the length of
// one realise: http://127.0.0.1:<ephemeral>/<random token>/ forwards GETs of
// nix-cache-info, <hash>.narinfo and nar/… to the controller as fetch
// messages over the agent's one authenticated connection, and streams the
// answers back chunk by chunk (a window of kWindow chunks per request asked
// for ahead, so the controller's latency hides behind the chunks already
// here; at most kMaxInFlight chunks on their way over all requests, and
// kMaxRequests requests at once). The token keeps other local users
// from reading through it. A loss of the connection holds the requests in
// flight until it is back, then continues each from its offset; nothing is
// cached.
//
// Threading: Open and Close may be called from any thread (they post to the
// io_context and wait); OnFetched and OnLinkDown run on the io_context thread.
#pragma once

#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/error.h"
#include "common/manifest.h"
#include "common/protocol.h"

namespace muster {

// The reserved substituter name that stands for the controller's cache.
constexpr const char* kControllerSubstituter = "muster:";

// Whether the manifest names the controller's cache.
bool UsesControllerCache(const Manifest& m);
// The manifest with "muster:" replaced by url (the other substituters stay).
Manifest WithControllerCache(Manifest m, const std::string& url);

class Substituter {
 public:
  // send: sends a text message to the controller; false when not connected.
  using SendFn = std::function<bool(std::string text)>;
  static constexpr std::size_t kChunkBytes = proto::kMaxFetchChunk;  // one binary frame
  static constexpr std::size_t kMaxRequests = 16;                    // HTTP requests served at once
  static constexpr std::size_t kWindow = 4;  // chunks per request asked for or not yet written
  // Chunks asked for and not yet answered, over all requests: what the
  // controller may have to queue for this connection stays well under what
  // it holds for one peer before it cuts it as not reading (protocol.h).
  static constexpr std::size_t kMaxInFlight = proto::kMaxFetchesInFlight;

  Substituter(boost::asio::io_context& ioc, SendFn send);
  ~Substituter();

  // Listens on 127.0.0.1 (ephemeral port) with a fresh token; returns the base URL.
  Result<std::string> Open();
  // Stops listening and cuts every request.
  void Close();

  void OnFetched(proto::Fetched f);
  // The connection dropped / is back (welcome): requests in flight wait for
  // it and continue from their offset (nix cannot retry a NAR it has begun to
  // unpack); one without progress for 120 s is cut.
  void OnLinkDown();
  void OnLinkUp();

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace muster
