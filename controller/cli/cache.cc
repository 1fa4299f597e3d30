// muster cache …, and the upload half of muster publish.
#include "controller/cli/cache.h"

#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "common/fsutil.h"
#include "common/process.h"
#include "controller/cli/commands.h"
#include "controller/cli/flake.h"

using nlohmann::json;

namespace muster::cli {

namespace {

constexpr std::size_t kInputBlock = 128 * 1024;  // fixed blocks: the same NAR compresses the same
constexpr std::size_t kPathInfoBatch = 256;
// The start of a NAR that decides, under "auto", whether it is worth
// compressing: zstd -1 must save at least kMinSaving of it.
constexpr std::size_t kProbeBytes = 1 << 20;
constexpr double kMinSaving = 0.03;

// Whether sample (the start of a NAR) compresses well enough to send it zstd.
bool WorthCompressing(std::string_view sample) {
  if (sample.empty()) return true;
  std::string out(ZSTD_compressBound(sample.size()), '\0');
  std::size_t n = ZSTD_compress(out.data(), out.size(), sample.data(), sample.size(), 1);
  if (ZSTD_isError(n)) return true;
  return double(n) <= double(sample.size()) * (1.0 - kMinSaving);
}

struct PathInfo {
  std::string path;
  std::string nar_hash;  // sha256:<nix32>
  std::uint64_t nar_size = 0;
  std::vector<std::string> references;
  std::string deriver;
};

std::string Human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
  return buf;
}

Result<std::string> RunNix(const std::vector<std::string>& argv, std::size_t max_output) {
  std::string exe = FindProgram(argv[0]);
  if (exe.empty()) return Err(argv[0] + " not found in PATH; install nix");
  RunOptions o;
  o.argv = argv;
  o.argv[0] = exe;
  o.env = NixEnv();
  o.max_output = max_output;
  o.timeout = std::chrono::minutes(30);
  SystemProcessRunner runner;
  auto r = runner.Run(o);
  if (!r.ok())
    return Err(ArgvToString({argv[0], argv.size() > 1 ? argv[1] : ""}) + " " + r.Describe());
  if (r.out.size() >= max_output)
    return Err(argv[0] + " printed more than " + Human(double(max_output)));
  return r.out;
}

Result<std::vector<PathInfo>> ClosureInfo(const std::vector<std::string>& toplevels) {
  std::vector<std::string> argv = {"nix-store", "--query", "--requisites"};
  argv.insert(argv.end(), toplevels.begin(), toplevels.end());
  auto out = RunNix(argv, 256u << 20);
  if (!out) return Err("listing the closure: " + out.message());
  std::vector<std::string> paths;
  std::size_t p = 0;
  while (p < out->size()) {
    auto nl = out->find('\n', p);
    if (nl == std::string::npos) nl = out->size();
    if (nl > p) paths.push_back(out->substr(p, nl - p));
    p = nl + 1;
  }
  std::vector<PathInfo> infos;
  for (std::size_t i = 0; i < paths.size(); i += kPathInfoBatch) {
    std::vector<std::string> a = {"nix", "path-info", "--json"};
    for (std::size_t j = i; j < std::min(paths.size(), i + kPathInfoBatch); ++j)
      a.push_back(paths[j]);
    auto text = RunNix(a, 256u << 20);
    if (!text) return Err("reading path info: " + text.message());
    json j = json::parse(*text, nullptr, false);
    if (!j.is_array()) return Err("nix path-info --json printed something that is not a list");
    for (const auto& e : j) {
      PathInfo pi;
      pi.path = e.value("path", "");
      auto h = nar::ParseSha256(e.value("narHash", ""));
      if (!h) return Err(pi.path + ": " + h.message());
      pi.nar_hash = nar::FormatSha256(*h);
      pi.nar_size = e.value("narSize", std::uint64_t{0});
      if (e.contains("references") && e["references"].is_array()) {
        for (const auto& r : e["references"]) pi.references.push_back(r.get<std::string>());
      }
      if (e.contains("deriver") && e["deriver"].is_string())
        pi.deriver = e["deriver"].get<std::string>();
      if (pi.path.empty() || pi.nar_size == 0) return Err("nix path-info gave no path or size");
      infos.push_back(std::move(pi));
    }
  }
  return infos;
}

class Progress {
 public:
  Progress(bool on, std::size_t paths, std::uint64_t bytes)
      : on_(on), paths_(paths), total_(bytes) {}
  void Path() {
    ++done_paths_;
    Show(true);
  }
  void Bytes(std::uint64_t n) {
    done_ += n;
    Show(false);
  }
  void End() {
    if (on_ && shown_) std::cerr << "\n";
  }

 private:
  void Show(bool force) {
    if (!on_) return;
    auto now = std::chrono::steady_clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    shown_ = true;
    double s = std::chrono::duration<double>(now - start_).count();
    std::cerr << "\r\x1b[Kuploading " << done_paths_ << "/" << paths_ << " paths, "
              << Human(double(done_)) << " of ~" << Human(double(total_)) << " (NAR), "
              << Human(s > 0 ? double(done_) / s : 0) << "/s" << std::flush;
  }
  bool on_;
  std::size_t paths_;
  std::uint64_t total_;
  std::size_t done_paths_ = 0;
  std::uint64_t done_ = 0;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_{};
};

// Chunks of one NAR as uploaded, made by a thread of their own (nix-store
// --dump piped through zstd, or not when the NAR's start shows that it does
// not compress) while the caller sends the previous ones: a bounded queue
// between the two. The choice is a function of the NAR's bytes, so a resumed
// upload makes the same one.
class ChunkMaker {
 public:
  struct Chunk {
    std::uint64_t start = 0;  // offset of bytes in the uploaded stream
    std::string bytes;
    std::uint64_t nar_seen = 0;        // NAR bytes read when this chunk was cut
    const char* compression = "zstd";  // of the whole stream: "zstd" | "none"
  };

  ChunkMaker(const PathInfo& pi, const UploadOptions& o) : pi_(pi), o_(o) {
    thread_ = std::thread([this] { Run(); });
  }
  ~ChunkMaker() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  // The next chunk; nullopt at the end (then failure() says whether it failed).
  std::optional<Chunk> Next() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || done_; });
    if (queue_.empty()) return std::nullopt;
    Chunk c = std::move(queue_.front());
    queue_.pop_front();
    cv_.notify_all();
    return c;
  }
  std::optional<Error> failure() {
    std::lock_guard lock(mu_);
    return failure_;
  }

 private:
  // Blocks while the queue is full; false when the consumer gave up.
  bool Push(Chunk c) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return stop_ || queue_.size() < std::max<std::size_t>(o_.window, 1); });
    if (stop_) return false;
    queue_.push_back(std::move(c));
    cv_.notify_all();
    return true;
  }

  void Finish(std::optional<Error> failure) {
    std::lock_guard lock(mu_);
    if (!failure_) failure_ = std::move(failure);
    done_ = true;
    cv_.notify_all();
  }

  void Run() {
    std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, o_.zstd_level);
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, 1);
    std::string in_block, out_buf, probe;
    std::string zbuf(ZSTD_CStreamOutSize(), '\0');
    std::uint64_t produced = 0;  // uploaded bytes cut into chunks so far
    std::uint64_t nar_seen = 0;
    std::optional<Error> failure;
    // Decided on the first kProbeBytes (or the whole NAR if smaller).
    std::optional<bool> raw;
    if (o_.compression == "zstd") raw = false;
    if (o_.compression == "none") raw = true;
    auto cut = [&](bool final) -> bool {
      while (out_buf.size() >= o_.chunk_bytes || (final && !out_buf.empty())) {
        std::size_t n = std::min(out_buf.size(), o_.chunk_bytes);
        Chunk c{produced, out_buf.substr(0, n), nar_seen, *raw ? "none" : "zstd"};
        produced += n;
        out_buf.erase(0, n);
        if (!Push(std::move(c))) return false;
      }
      return true;
    };
    auto compress = [&](std::string_view block, ZSTD_EndDirective mode) -> bool {
      ZSTD_inBuffer in{block.data(), block.size(), 0};
      for (;;) {
        ZSTD_outBuffer out{zbuf.data(), zbuf.size(), 0};
        std::size_t left = ZSTD_compressStream2(cctx.get(), &out, &in, mode);
        if (ZSTD_isError(left)) {
          failure = Err(std::string("zstd: ") + ZSTD_getErrorName(left));
          return false;
        }
        out_buf.append(zbuf.data(), out.pos);
        bool done = mode == ZSTD_e_end ? left == 0 : in.pos == in.size;
        if (done) break;
      }
      return cut(false);
    };
    RunOptions ro;
    ro.argv = {FindProgram("nix-store"), "--dump", pi_.path};
    ro.env = NixEnv();
    ro.timeout = std::chrono::hours(24);
    // NAR bytes in order, once the encoding is decided.
    auto feed = [&](std::string_view bytes) -> bool {
      if (*raw) {
        out_buf.append(bytes);
        return cut(false);
      }
      while (!bytes.empty()) {
        std::size_t take = std::min(bytes.size(), kInputBlock - in_block.size());
        in_block.append(bytes.substr(0, take));
        bytes.remove_prefix(take);
        if (in_block.size() == kInputBlock) {
          if (!compress(in_block, ZSTD_e_continue)) return false;
          in_block.clear();
        }
      }
      return true;
    };
    auto decide = [&]() -> bool {
      // Exactly the first kProbeBytes, however the pipe cut them.
      raw = !WorthCompressing(std::string_view(probe).substr(0, kProbeBytes));
      std::string p = std::move(probe);
      probe.clear();
      return feed(p);
    };
    ro.on_stdout = [&](std::string_view bytes) {
      nar_seen += bytes.size();
      if (raw) return feed(bytes);
      probe.append(bytes);
      return probe.size() < kProbeBytes || decide();
    };
    SystemProcessRunner runner;
    auto r = runner.Run(ro);
    if (failure) return Finish(std::move(failure));
    {
      std::lock_guard lock(mu_);
      if (stop_) return Finish(Err("stopped"));
    }
    if (!r.ok()) return Finish(Err("nix-store --dump " + pi_.path + " " + r.Describe()));
    if (nar_seen != pi_.nar_size) {
      return Finish(Err("nix-store --dump " + pi_.path + " gave " + std::to_string(nar_seen) +
                        " bytes, nix path-info says " + std::to_string(pi_.nar_size) +
                        " (run nix-store --verify)"));
    }
    if (!raw && !decide()) {
      return Finish(failure ? std::move(failure) : std::optional<Error>(Err("stopped")));
    }
    if ((!*raw && !compress(in_block, ZSTD_e_end)) || !cut(true)) {
      return Finish(failure ? std::move(failure) : std::optional<Error>(Err("stopped")));
    }
    Finish(std::nullopt);
  }

  const PathInfo& pi_;
  const UploadOptions& o_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;
  bool done_ = false;
  bool stop_ = false;
  std::optional<Error> failure_;
  std::thread thread_;
};

// One attempt at streaming a path's NAR, compressed or not, from offset of
// the upload the controller staged as *compression ("" when unknown): binary
// cache.upload frames, up to o.window of them in flight while the next ones
// are made. A staged upload in another encoding than this NAR's is started
// over. Sets *compression to the encoding sent, and *cut when the connection
// broke (worth a reconnect).
Status StreamPath(Connection& c, const PathInfo& pi, std::uint64_t offset, const UploadOptions& o,
                  Progress& progress, std::string* compression, bool* cut) {
  ChunkMaker maker(pi, o);
  std::deque<std::uint64_t> in_flight;  // request ids, oldest first
  std::uint64_t reported = 0;           // NAR bytes shown on the progress line
  auto await_one = [&]() -> Status {
    auto r = c.Await(in_flight.front(), std::chrono::minutes(5));
    in_flight.pop_front();
    if (!r) {
      // "resume from": the controller has more bytes than this attempt
      // thought (an earlier connection's last chunks landed late): ask again.
      *cut = r.message().find("connection") != std::string::npos ||
             r.message().find("no answer") != std::string::npos ||
             r.message().find("resume from") != std::string::npos;
      return Err(r.message());
    }
    return Status::Ok();
  };
  while (auto chunk = maker.Next()) {
    if (*compression != chunk->compression) {
      if (!compression->empty() && offset > 0 && !o.progress) {
        std::cerr << "the controller holds part of a " << *compression << " upload of " << pi.path
                  << "; sending it " << chunk->compression << " from the start\n";
      }
      *compression = chunk->compression;
      offset = 0;
    }
    progress.Bytes(chunk->nar_seen - reported);
    reported = chunk->nar_seen;
    std::uint64_t end = chunk->start + chunk->bytes.size();
    if (end <= offset) continue;  // the controller has these bytes already
    std::size_t skip = chunk->start >= offset ? 0 : static_cast<std::size_t>(offset - chunk->start);
    if (skip) chunk->bytes.erase(0, skip);
    in_flight.push_back(c.Send("cache.upload",
                               {{"path", pi.path},
                                {"narHash", pi.nar_hash},
                                {"narSize", pi.nar_size},
                                {"offset", chunk->start + skip},
                                {"compression", chunk->compression}},
                               std::move(chunk->bytes)));
    if (in_flight.size() >= std::max<std::size_t>(o.window, 1)) {
      if (auto st = await_one(); !st) return st;
    }
  }
  if (auto f = maker.failure()) return *f;
  while (!in_flight.empty()) {
    if (auto st = await_one(); !st) return st;
  }
  progress.Bytes(pi.nar_size - reported);
  return Status::Ok();
}

}  // namespace

std::string DefaultCacheKeyPath() { return ConfigHome() + "/cache.key"; }

Result<nar::SigningKey> LoadCacheKey(const std::string& file) {
  std::string path = file.empty() ? DefaultCacheKeyPath() : file;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return Err("no cache signing key at " + path +
               (file.empty()
                    ? "; create one with 'muster key generate --cache' or pass --cache-key FILE"
                    : "; check --cache-key"));
  }
  auto text = ReadFile(path, 4096);
  if (!text) return text.error();
  auto k = nar::ParseSigningKey(*text);
  if (!k) return Err(path + ": " + k.message());
  return k;
}

Status UploadClosures(std::unique_ptr<Connection>& conn,
                      const std::function<std::unique_ptr<Connection>()>& reconnect,
                      const std::vector<std::string>& toplevels, const nar::SigningKey& key,
                      const UploadOptions& o) {
  // A toplevel no longer in the local store (uploaded earlier, then
  // collected) is fine if the controller has it already.
  std::vector<std::string> local;
  for (const auto& t : toplevels) {
    if (RunNix({"nix-store", "--check-validity", t}, 4096).ok()) {
      local.push_back(t);
      continue;
    }
    auto have = conn->Call("cache.missing", {{"paths", {{{"path", t}}}}});
    if (!have) return Err("asking the controller whether it has " + t + ": " + have.message());
    if (!(*have)["missing"].empty()) {
      return Err(t +
                 " is neither in the local store nor in the controller's cache; build it here "
                 "first (nix-build / nix build), then publish");
    }
  }
  if (local.empty()) return Status::Ok();
  auto infos = ClosureInfo(local);
  if (!infos) return infos.error();
  std::map<std::string, const PathInfo*> by_path;
  json ask = json::array();
  for (const auto& pi : *infos) {
    by_path[pi.path] = &pi;
    ask.push_back({{"path", pi.path}, {"narHash", pi.nar_hash}, {"narSize", pi.nar_size}});
  }
  auto missing = conn->Call("cache.missing", {{"paths", ask}}, std::chrono::minutes(5));
  if (!missing) return Err("asking the controller which paths it lacks: " + missing.message());
  struct Todo {
    const PathInfo* pi;
    std::uint64_t offset;     // staged bytes of the upload in compression
    std::string compression;  // "" until known
  };
  std::vector<Todo> todo;
  std::uint64_t bytes = 0;
  for (const auto& m : (*missing)["missing"]) {
    auto it = by_path.find(m.value("path", ""));
    if (it == by_path.end()) return Err("the controller asked for a path outside the closure");
    todo.push_back({it->second, m.value("offset", std::uint64_t{0}), m.value("compression", "")});
    bytes += it->second->nar_size;
  }
  Progress progress(o.progress, todo.size(), bytes);
  for (auto& [pi, offset, compression] : todo) {
    bool restarted = false;
    if (offset > 0 && !o.progress) {
      std::cerr << "resuming the upload of " << pi->path << " at " << offset << " bytes\n";
    }
    for (int attempt = 1;; ++attempt) {
      bool cut = false;
      Status st = conn ? StreamPath(*conn, *pi, offset, o, progress, &compression, &cut)
                       : Status(Err("not connected"));
      if (st.ok()) {
        nar::NarInfo info;
        info.store_path = pi->path;
        info.nar_hash = pi->nar_hash;
        info.nar_size = pi->nar_size;
        for (const auto& r : pi->references) info.references.push_back(r.substr(11));
        std::sort(info.references.begin(), info.references.end());
        std::string sig = nar::Sign(info, key);
        auto done = conn->Call("cache.commit",
                               {{"path", pi->path},
                                {"narHash", pi->nar_hash},
                                {"narSize", pi->nar_size},
                                {"references", pi->references},
                                {"deriver", pi->deriver},
                                {"sigs", {sig}},
                                {"compression", compression}},
                               std::chrono::minutes(30));
        if (done) break;
        // Bytes staged by another build of zstd, or a torn earlier upload:
        // the controller discarded them; start this path over once.
        if (!restarted && done.message().find("discarded") != std::string::npos) {
          restarted = true;
          offset = 0;
          continue;
        }
        st = Err(done.message());
        cut = done.message().find("connection") != std::string::npos;
      }
      if (!cut || attempt >= o.max_attempts) {
        progress.End();
        return Err("uploading " + pi->path + " to the controller: " + st.message());
      }
      std::cerr << "\nmuster: connection lost while uploading " << pi->path << " (" << st.message()
                << "); reconnecting and resuming\n";
      conn = reconnect();
      if (!conn) continue;
      json ask_one = {{"path", pi->path}, {"narHash", pi->nar_hash}, {"narSize", pi->nar_size}};
      if (!compression.empty()) ask_one["compression"] = compression;
      auto again = conn->Call("cache.missing", {{"paths", {ask_one}}});
      if (!again) continue;
      if ((*again)["missing"].empty()) break;  // it made it after all
      offset = (*again)["missing"][0].value("offset", std::uint64_t{0});
    }
    progress.Path();
  }
  progress.End();
  return Status::Ok();
}

int CachePush(const Globals& g, const std::vector<std::string>& paths,
              const std::string& key_file) {
  auto key = LoadCacheKey(key_file);
  if (!key) return Die(key.message(), kExitUsage);
  SecretKey op = SecretKey::Generate();
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn, &op)) return rc;
  UploadOptions uo;
  uo.progress = !g.json_out && ::isatty(2);
  auto st = UploadClosures(
      conn,
      [&]() -> std::unique_ptr<Connection> {
        std::unique_ptr<Connection> again;
        if (OpenConnection(g, &again, &op) != 0) return nullptr;
        return again;
      },
      paths, *key, uo);
  if (!st) return Die(st.message(), kExitFailed);
  if (!g.json_out)
    std::cout << "the controller's cache holds the closures of " << paths.size() << " path(s)\n";
  return 0;
}

int CacheCommand(const Globals& g, const std::string& verb) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto r = conn->Call(verb == "gc" ? "cache.gc" : "cache.status", json::object(),
                      std::chrono::minutes(10));
  if (!r) return Die(r.message(), kExitFailed);
  if (g.json_out) {
    std::cout << r->dump() << "\n";
    return 0;
  }
  auto u = [&](const char* k) { return (*r).value(k, std::uint64_t{0}); };
  if (verb == "gc") {
    std::cout << "removed " << u("paths") << " paths, freed " << Human(double(u("bytes"))) << "\n";
    return 0;
  }
  PrintTable(
      {{"paths", std::to_string(u("paths"))},
       {"size", Human(double(u("bytes"))) + " of " + Human(double(u("maxBytes"))) + " (NARs " +
                    Human(double(u("narBytes"))) + " uncompressed)"},
       {"uploads in progress",
        std::to_string(u("stagedPaths")) + " (" + Human(double(u("stagedBytes"))) + ")"},
       {"gc would free", std::to_string(u("gcPaths")) + " paths, " + Human(double(u("gcBytes")))}});
  return 0;
}

int CacheKeyGenerate(const Globals& g, const std::string& out_path, const std::string& name) {
  std::string out = out_path.empty() ? DefaultCacheKeyPath() : out_path;
  struct stat st {};
  if (::stat(out.c_str(), &st) == 0)
    return Die(out + " already exists; refusing to overwrite a key", kExitUsage);
  if (auto s = MakeDirs(std::filesystem::path(out).parent_path(), 0700); !s)
    return Die(s.message(), kExitUsage);
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  auto k = nar::GenerateSigningKey(name.empty() ? std::string(host) + "-muster-1" : name);
  bool existed = false;
  if (auto s = WriteFileExclusive(out, nar::SigningKeyText(k) + "\n", 0600, &existed); !s) {
    return Die(s.message(), kExitFailed);
  }
  (void)WriteFileAtomic(out + ".pub", nar::PublicKeyText(k) + "\n", 0644);
  if (g.json_out) {
    std::cout << json{{"key", nar::PublicKeyText(k)}, {"path", out}}.dump() << "\n";
  } else {
    std::cout << nar::PublicKeyText(k) << "\n";
    std::cerr << "wrote Nix cache signing key " << out << " (0600) and " << out << ".pub\n";
  }
  return 0;
}

}  // namespace muster::cli
