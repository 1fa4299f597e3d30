#include "agent/system_ops.h"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "agent/disk_space.h"
#include "common/fsutil.h"
#include "common/json_limits.h"
#include "common/utf8.h"

namespace muster {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string Canonical(const std::string& p) {
  std::error_code ec;
  auto c = fs::canonical(p, ec);
  return ec ? std::string() : c.string();
}

std::string SelfExe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : p.string();
}

bool SystemdIsPid1() {
  std::error_code ec;
  return fs::exists("/run/systemd/system", ec);
}

class NixSystem final : public SystemOps {
 public:
  NixSystem(const AgentConfig& c, ProcessRunner& r) : cfg_(c), runner_(r) {
    nix_store_ = FindProgram("nix-store", c.nix_bin_dir);
    nix_env_ = FindProgram("nix-env", c.nix_bin_dir);
    systemd_run_ = FindProgram("systemd-run", "");
    systemctl_ = FindProgram("systemctl", "");
  }

  Kind DetectKind(const std::string& toplevel) override {
    std::error_code ec;
    if (fs::exists(toplevel + "/nixos-version", ec)) return Kind::kNixos;
    if (fs::exists(toplevel + "/darwin-version", ec)) return Kind::kDarwin;
    if (fs::exists(toplevel + "/hm-version", ec)) return Kind::kHomeManager;
    return Kind::kProfile;
  }

  std::string ActiveToplevel() override {
    std::string cur = Canonical(cfg_.current_system);
    if (!cur.empty()) return cur;
    return Canonical(cfg_.profile);
  }

  Result<std::int64_t> Realise(const Manifest& m, const LineSink& sink) override {
    if (nix_store_.empty()) return Err("nix-store not found; install Nix or set nixBinDir");
    std::vector<std::string> argv = {nix_store_, "--realise", m.toplevel, "--max-jobs", "0"};
    if (!m.substituters.empty()) {
      argv.insert(argv.end(), {"--option", "substituters", Join(m.substituters)});
    }
    if (!m.trusted_public_keys.empty()) {
      argv.insert(argv.end(), {"--option", "trusted-public-keys", Join(m.trusted_public_keys)});
    }
    if (auto room = CheckStoreRoom(m, sink); !room) return Err(room.message());
    auto r = Run(argv, cfg_.realise_timeout, "realise", sink);
    if (!r.ok()) {
      const std::string& e = r.err_tail;
      if (e.find("lacks a signature by a trusted key") != std::string::npos ||
          e.find("not signed by any of the keys") != std::string::npos ||
          e.find("valid signature") != std::string::npos) {
        return Err("nix refused " + m.toplevel +
                   ": it is not signed by any of the manifest's trusted public keys (" +
                   Join(m.trusted_public_keys) + "); sign the binary cache with one of them");
      }
      if (e.find("don't know how to build") != std::string::npos ||
          e.find("cannot build") != std::string::npos) {
        return Err(m.toplevel + " is not available from the substituters (" + Join(m.substituters) +
                   "); push it with 'nix copy --to' first (this machine never builds)");
      }
      return Err("nix-store --realise " + m.toplevel + " " + r.Describe());
    }
    if (auto room = CheckBootRoom(m, sink); !room) return Err(room.message());
    // Closure size: the sum of the NAR sizes of all requisites.
    auto req = Run({nix_store_, "--query", "--requisites", m.toplevel}, std::chrono::minutes(5), "",
                   nullptr);
    if (!req.ok()) return std::int64_t{0};
    std::vector<std::string> argv2 = {nix_store_, "--query", "--size"};
    std::stringstream ss(req.out);
    std::string line;
    while (std::getline(ss, line)) {
      if (!line.empty()) argv2.push_back(line);
    }
    auto sizes = Run(argv2, std::chrono::minutes(5), "", nullptr);
    std::int64_t total = 0;
    std::stringstream s2(sizes.out);
    while (std::getline(s2, line)) {
      try {
        total += std::stoll(line);
      } catch (...) {
      }
    }
    return total;
  }

  Result<FetchEstimate> EstimateFetch(const Manifest& m) override {
    if (nix_store_.empty()) return Err("nix-store not found; install Nix or set nixBinDir");
    std::vector<std::string> argv = {nix_store_,   "--realise", m.toplevel,
                                     "--max-jobs", "0",         "--dry-run"};
    if (!m.substituters.empty()) {
      argv.insert(argv.end(), {"--option", "substituters", Join(m.substituters)});
    }
    if (!m.trusted_public_keys.empty()) {
      argv.insert(argv.end(), {"--option", "trusted-public-keys", Join(m.trusted_public_keys)});
    }
    // The summary line comes before the list of paths, which may be far longer
    // than the stderr tail a RunResult keeps.
    std::string summary;
    LineSink keep = [&summary](const std::string&, const std::string& line) {
      if (summary.empty() && line.find("will be fetched") != std::string::npos) summary = line;
    };
    auto r = Run(argv, std::chrono::minutes(10), "dry-run", keep);
    if (!r.ok()) return Err("nix-store --realise --dry-run " + m.toplevel + " " + r.Describe());
    return ParseDryRunFetch(summary);
  }

  Result<std::vector<std::string>> Closure(const std::string& path) override {
    if (nix_store_.empty()) return Err("nix-store not found; install Nix or set nixBinDir");
    auto r =
        Run({nix_store_, "--query", "--requisites", path}, std::chrono::minutes(5), "", nullptr);
    if (!r.ok()) return Err("nix-store --query --requisites " + path + " " + r.Describe());
    std::vector<std::string> out;
    std::stringstream ss(r.out);
    std::string line;
    while (std::getline(ss, line)) {
      if (!line.empty()) out.push_back(line);
    }
    return out;
  }

  Result<std::string> DryActivate(const std::string& toplevel, const LineSink& sink) override {
    const std::string script = toplevel + "/bin/switch-to-configuration";
    std::error_code ec;
    if (!fs::exists(script, ec)) return Err(toplevel + " has no bin/switch-to-configuration");
    std::string output;
    LineSink keep = [&](const std::string& stream, const std::string& line) {
      if (output.size() < (1u << 20)) output += line + "\n";
      if (sink) sink(stream, line);
    };
    std::map<std::string, std::string> env = {{"MUSTER_CURRENT_SYSTEM", cfg_.current_system},
                                              {"MUSTER_PROFILE", cfg_.profile}};
    auto r = Run({script, "dry-activate"}, cfg_.activation_timeout, "preview", keep, env);
    if (!r.ok()) return Err(script + " dry-activate " + r.Describe());
    return output;
  }

  Status SetProfile(const std::string& toplevel, const LineSink& sink) override {
    if (nix_env_.empty()) return Err("nix-env not found; install Nix or set nixBinDir");
    if (auto st = MakeDirs(fs::path(cfg_.profile).parent_path(), 0755); !st) return st;
    auto r = Run({nix_env_, "-p", cfg_.profile, "--set", toplevel}, std::chrono::minutes(5),
                 "profile", sink);
    if (!r.ok())
      return Err("nix-env -p " + cfg_.profile + " --set " + toplevel + " " + r.Describe());
    return Status::Ok();
  }

  ActivateOutcome Activate(Kind kind, const std::string& toplevel, Action action,
                           const std::string& tag, const LineSink& sink) override {
    std::vector<std::string> cmd;
    switch (kind) {
      case Kind::kNixos:
        cmd = {toplevel + "/bin/switch-to-configuration", std::string(ToString(action))};
        break;
      case Kind::kDarwin:
      case Kind::kHomeManager:
        if (action == Action::kDryActivate || action == Action::kBoot) {
          sink("activate", std::string(ToString(kind)) + " has no '" +
                               std::string(ToString(action)) + "' activation; nothing to run");
          return {Status::Ok()};
        }
        cmd = {toplevel + "/activate"};
        if (kind == Kind::kHomeManager && !cfg_.home_manager_user.empty()) {
          // home-manager activates as the user whose home it manages.
          std::string runuser = FindProgram("runuser");
          std::string sudo = FindProgram("sudo");
          if (!runuser.empty()) {
            cmd = {runuser, "-u", cfg_.home_manager_user, "--", toplevel + "/activate"};
          } else if (!sudo.empty()) {
            cmd = {sudo, "-u", cfg_.home_manager_user, "-H", "--", toplevel + "/activate"};
          } else {
            return {Err("homeManagerUser is set but neither runuser nor sudo was found")};
          }
        }
        break;
      case Kind::kAuto:
      case Kind::kProfile:
        sink("activate", "plain profile: nothing to activate");
        return {Status::Ok()};
    }
    std::error_code ec;
    std::string script =
        kind == Kind::kNixos ? toplevel + "/bin/switch-to-configuration" : toplevel + "/activate";
    if (!fs::exists(script, ec))
      return {Err(toplevel + " has no " + script.substr(toplevel.size() + 1))};
    if (auto st = MakeDirs(cfg_.state_dir + "/activations", 0700); !st) return {st};
    std::string lock = LockPath(tag), result = ResultPath(tag);
    if (Running(tag)) {
      // Started by an agent before this one (a restart during a rollback):
      // its outcome is this call's outcome; a second one would collide.
      sink("activate", "an activation for " + tag + " started before the agent restarted is " +
                           "still running; waiting for it");
      std::string detail;
      switch (WaitFor(tag, &detail)) {
        case ActivationEvidence::kSucceeded:
          return {Status::Ok()};
        case ActivationEvidence::kRunning:
          return {Status::Ok(), true};
        case ActivationEvidence::kFailed:
          return {Err(ArgvToString(cmd) + " " + detail)};
        case ActivationEvidence::kUnknown:
          return {Err(ArgvToString(cmd) + " ended without recording a result; see the journal of " +
                      UnitName(tag))};
      }
    }
    if (interrupted_.load()) return {Err("the agent is stopping; activation not started")};
    ::unlink(result.c_str());
    std::vector<std::string> argv;
    std::map<std::string, std::string> env = {{"MUSTER_CURRENT_SYSTEM", cfg_.current_system},
                                              {"MUSTER_PROFILE", cfg_.profile}};
    if (UseSystemd()) {
      if (systemd_run_.empty())
        return {
            Err("systemdRun is \"always\" but systemd-run was not found; install systemd or "
                "set systemdRun to \"never\"")};
      argv = {systemd_run_,
              "--pipe",
              "--wait",
              "--collect",
              "--quiet",
              "--service-type=exec",
              "--unit=" + UnitName(tag)};
      for (const auto& [k, v] : env) argv.push_back("--setenv=" + k + "=" + v);
      argv.push_back("--");
    }
    std::string self = SelfExe();
    if (self.empty())
      return {Err("cannot find the agent's own executable for the activation wrapper")};
    argv.insert(argv.end(), {self, "--activation-wrapper", lock, result, "--"});
    argv.insert(argv.end(), cmd.begin(), cmd.end());
    auto r = Run(argv, cfg_.activation_timeout, "activate", sink, env, &interrupted_);
    if (r.detached) {
      // Stopping: the wrapper (in its transient unit, or a child in its own
      // process group that KillMode=process spares) finishes on its own.
      spdlog::info("agent stopping: {} goes on without it; the next agent reads its result",
                   UseSystemd() ? UnitName(tag) : "the activation");
      return {Status::Ok(), true};
    }
    if (!r.ok()) {
      std::string detail;
      auto ev = ReadResult(result, &detail);
      if (ev == ActivationEvidence::kFailed) return {Err(ArgvToString(cmd) + " " + detail)};
      return {Err(ArgvToString(cmd) + " " + r.Describe())};
    }
    return {Status::Ok()};
  }

  ActivationEvidence ActivationResult(const std::string& tag, std::string* detail) override {
    return WaitFor(tag, detail);
  }

  void Interrupt() override { interrupted_.store(true); }

  bool RebootRequired(const std::string& toplevel) override {
    std::error_code ec;
    if (!fs::exists(cfg_.booted_system, ec)) return false;
    for (const char* part : {"kernel", "initrd", "kernel-modules"}) {
      std::string booted = Canonical(cfg_.booted_system + "/" + part);
      std::string next = Canonical(toplevel + "/" + part);
      if (booted != next) return true;
    }
    return false;
  }

  Status Reboot() override {
    std::string systemctl = FindProgram("systemctl", "");
    std::string shutdown = FindProgram("shutdown", "");
    std::vector<std::string> argv;
    if (!systemctl.empty()) {
      argv = {systemctl, "reboot"};
    } else if (!shutdown.empty()) {
      argv = {shutdown, "-r", "now"};
    } else {
      return Err("neither systemctl nor shutdown found");
    }
    auto r = Run(argv, std::chrono::minutes(1), "", nullptr);
    if (!r.ok()) return Err("reboot " + r.Describe());
    return Status::Ok();
  }

 private:
  // Before fetching: what nix says it will fetch for this very realise (same
  // substituters and keys) against the free space of the store's file system.
  // A dry run that fails says nothing here; the realise itself then reports
  // what is wrong.
  Status CheckStoreRoom(const Manifest& m, const LineSink& sink) {
    auto est = EstimateFetch(m);
    if (!est || !est->known) return Status::Ok();  // nothing to fetch, or the realise will say
    const FetchEstimate& e = *est;
    auto free = FreeBytes(cfg_.store_dir);
    if (!free) {
      spdlog::warn("free-space check skipped: {}", free.message());
      return Status::Ok();
    }
    sink("realise", std::to_string(e.paths) + " store paths to fetch: " +
                        HumanSize(e.download_bytes) + " download, " + HumanSize(e.unpacked_bytes) +
                        " unpacked; " + HumanSize(*free) + " free in " + cfg_.store_dir);
    return CheckRoom("generation " + std::to_string(m.generation) + " of " + m.machine + " (" +
                         std::to_string(e.paths) + " store paths, " + HumanSize(e.download_bytes) +
                         " download)",
                     cfg_.store_dir, *free, e.unpacked_bytes, cfg_.min_free_store_bytes,
                     "Free space (nix-collect-garbage --delete-older-than 30d) or lower "
                     "minFreeStoreMiB, then publish again.");
  }

  // After fetching, before anything changes: a NixOS generation that installs
  // boot entries (switch, boot) copies its kernel and initrd to /boot unless
  // the running system has the same ones.
  Status CheckBootRoom(const Manifest& m, const LineSink& sink) {
    if (m.action != Action::kSwitch && m.action != Action::kBoot) return Status::Ok();
    if (DetectKind(m.toplevel) != Kind::kNixos) return Status::Ok();
    std::error_code ec;
    if (!fs::is_directory(cfg_.boot_dir, ec)) return Status::Ok();
    std::int64_t need = 0;
    for (const char* part : {"kernel", "initrd"}) {
      std::string next = Canonical(m.toplevel + "/" + part);
      if (next.empty() || next == Canonical(cfg_.current_system + "/" + part)) continue;
      auto size = fs::file_size(next, ec);
      if (!ec) need += static_cast<std::int64_t>(size);
    }
    if (need == 0) return Status::Ok();
    auto free = FreeBytes(cfg_.boot_dir);
    if (!free) {
      spdlog::warn("free-space check skipped: {}", free.message());
      return Status::Ok();
    }
    sink("realise", "new kernel and initrd: " + HumanSize(need) + "; " + HumanSize(*free) +
                        " free in " + cfg_.boot_dir);
    return CheckRoom("the boot entry of generation " + std::to_string(m.generation) + " of " +
                         m.machine + " (new kernel and initrd)",
                     cfg_.boot_dir, *free, need, cfg_.min_free_boot_bytes,
                     "Remove old boot entries (nix-collect-garbage -d, then switch again) or "
                     "grow " +
                         cfg_.boot_dir + ", then publish again.");
  }

  static std::string Join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
    return s;
  }

  bool UseSystemd() const {
    return cfg_.systemd_run == "always" ||
           (cfg_.systemd_run == "auto" && SystemdIsPid1() && !systemd_run_.empty());
  }

  static std::string UnitName(const std::string& tag) {
    return "muster-activate-" + tag + ".service";
  }

  // An activation for tag is running: its wrapper holds the lock, or (with
  // systemd) its transient unit is still active, which also covers the moment
  // before the wrapper took the lock.
  bool Running(const std::string& tag) {
    int fd = ::open(LockPath(tag).c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
      bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0;
      ::close(fd);
      if (held) return true;
    }
    if (!UseSystemd() || systemctl_.empty()) return false;
    auto r = Run({systemctl_, "show", "--property=ActiveState", "--value", UnitName(tag)},
                 std::chrono::seconds(30), "", nullptr);
    std::string state = r.out.substr(0, r.out.find('\n'));
    return r.ok() && (state == "active" || state == "activating" || state == "deactivating" ||
                      state == "reloading");
  }

  // Waits (up to activationTimeout) while the activation for tag runs, then
  // reads its result; kRunning when interrupted first.
  ActivationEvidence WaitFor(const std::string& tag, std::string* detail) {
    auto deadline = std::chrono::steady_clock::now() + cfg_.activation_timeout;
    while (Running(tag)) {
      if (interrupted_.load()) return ActivationEvidence::kRunning;
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return ReadResult(ResultPath(tag), detail);
  }

  std::string LockPath(const std::string& tag) const {
    return cfg_.state_dir + "/activations/" + tag + ".lock";
  }
  std::string ResultPath(const std::string& tag) const {
    return cfg_.state_dir + "/activations/" + tag + ".result";
  }

  static ActivationEvidence ReadResult(const std::string& path, std::string* detail) {
    auto text = ReadFile(path, 65536);
    if (!text) return ActivationEvidence::kUnknown;
    auto j = ParseJsonBounded(*text);
    if (!j || !j->is_object()) return ActivationEvidence::kUnknown;
    int code = j->value("exit", -1);
    if (detail) *detail = SanitizeUtf8(j->value("detail", std::string()));
    return code == 0 ? ActivationEvidence::kSucceeded : ActivationEvidence::kFailed;
  }

  RunResult Run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                const std::string& stream, const LineSink& sink,
                std::map<std::string, std::string> env = {},
                const std::atomic<bool>* detach = nullptr) {
    RunOptions o;
    o.detach = detach;
    o.argv = argv;
    o.timeout = timeout;
    o.env = std::move(env);
    o.max_output = 64u << 20;
    if (sink && !stream.empty()) {
      o.on_line = [&](bool, const std::string& line) { sink(stream, line); };
    }
    spdlog::debug("running {}", ArgvToString(argv));
    return runner_.Run(o);
  }

  const AgentConfig& cfg_;
  ProcessRunner& runner_;
  std::string nix_store_, nix_env_, systemd_run_, systemctl_;
  std::atomic<bool> interrupted_{false};
};

}  // namespace

std::unique_ptr<SystemOps> MakeNixSystem(const AgentConfig& config, ProcessRunner& runner) {
  return std::make_unique<NixSystem>(config, runner);
}

int RunActivationWrapper(const std::string& lock_path, const std::string& result_path,
                         const std::vector<std::string>& argv) {
  ::signal(SIGPIPE, SIG_IGN);  // the agent reading our output may go away
  ::signal(SIGHUP, SIG_IGN);
  int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0 || ::flock(fd, LOCK_EX) != 0) {
    std::cerr << "activation wrapper: cannot lock " << lock_path << "\n";
    return 125;
  }
  SystemProcessRunner runner;
  RunOptions o;
  o.argv = argv;
  o.timeout = std::chrono::hours(24);
  o.max_output = 0;
  o.on_line = [](bool is_err, const std::string& line) {
    std::string l = line + "\n";
    // Errors (EPIPE once the agent is gone) are deliberately ignored.
    (void)!::write(is_err ? 2 : 1, l.data(), l.size());
  };
  RunResult r = runner.Run(o);
  int code = r.exited ? r.exit_code : 128 + r.signal;
  if (!r.start_error.empty()) code = 127;
  json j = {{"exit", code}, {"signal", r.signal}, {"detail", r.ok() ? "" : r.Describe()}};
  (void)WriteFileAtomic(result_path, DumpJson(j) + "\n", 0600);
  ::close(fd);
  return code;
}

}  // namespace muster
