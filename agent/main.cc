// muster-agent: keeps one connection to the controller and deploys what it is
// given. See README.md for the configuration file.
#include <malloc.h>
#include <signal.h>

#include <CLI/CLI.hpp>
#include <boost/asio/signal_set.hpp>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <thread>

#include "agent/agent.h"
#include "agent/config.h"
#include "agent/floor.h"
#include "agent/system_ops.h"
#include "common/crypto.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/tls.h"

using namespace muster;

namespace {
std::int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Hidden mode used for activations: muster-agent --activation-wrapper LOCK RESULT -- CMD…
int WrapperMain(int argc, char** argv) {
  if (argc < 6 || std::string(argv[4]) != "--") {
    std::cerr << "usage: muster-agent --activation-wrapper LOCK RESULT -- COMMAND [ARGS…]\n";
    return 2;
  }
  std::vector<std::string> cmd(argv + 5, argv + argc);
  return RunActivationWrapper(argv[2], argv[3], cmd);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--activation-wrapper") return WrapperMain(argc, argv);
  ::signal(SIGPIPE, SIG_IGN);
#ifdef __GLIBC__
  // The controller's cache chunks (1 MiB each, a few on their way) come and
  // go while nix realises through the agent. Under glibc's defaults the heap
  // top they freed was trimmed and faulted in again, zeroed, for the next
  // one. Chunks stay on the heap and up to 16 MiB of it is kept; the
  // substituter gives it back when the realise ends (Substituter::Close), so
  // an idle agent holds none of it.
  ::mallopt(M_MMAP_THRESHOLD, 4 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 16 << 20);
#endif
  InitCrypto();
  CLI::App app{"muster-agent: pulls signed system generations from a muster controller"};
  app.set_version_flag("--version", std::string("muster-agent ") + MUSTER_VERSION);
  std::string config_path = "/etc/muster/agent.json";
  bool print_key = false, check_config = false;
  app.add_option("--config", config_path, "configuration file (JSON)")->capture_default_str();
  app.add_flag("--print-key", print_key,
               "create the machine key on first use, print its public key and exit");
  app.add_flag("--check-config", check_config, "validate the configuration and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto cfg = LoadAgentConfig(config_path);
  if (!cfg) {
    std::cerr << "muster-agent: " << cfg.message() << "\n";
    return 2;
  }
  if (!cfg->maintenance_time_zone.empty()) {
    // Maintenance windows are wall-clock times in this zone (agent/windows.h);
    // set before any thread starts, so localtime_r is safe everywhere after.
    ::setenv("TZ", (":" + cfg->maintenance_time_zone).c_str(), 1);
    ::tzset();
  }
  if (check_config) {
    std::cout << "configuration is valid\n";
    return 0;
  }
  if (auto st = MakeDirs(cfg->state_dir, 0700); !st) {
    std::cerr << "muster-agent: " << st.message() << "\n";
    return 1;
  }
  // The key and the replay floor (floor.json) are created together; a
  // provided key (machineKeyFile) gets its floor at the first start.
  auto key = cfg->KeyProvided()
                 ? LoadProvidedMachineKey(cfg->KeyPath())
                 : LoadOrCreateMachineKey(cfg->KeyPath(), cfg->FloorPath(), NowMs() / 1000);
  if (!key) {
    std::cerr << "muster-agent: " << key.message() << "\n";
    return 1;
  }
  if (print_key) {
    std::cout << key->public_key().ToText() << "\n";
    // For 'muster machine sign NAME --fingerprint …' on the operator's side.
    std::cerr << "fingerprint " << key->public_key().Fingerprint() << "\n";
    return 0;
  }
  if (!SetupLogging("muster-agent", cfg->log_level, cfg->log_file)) {
    spdlog::warn("unknown logLevel '{}'; using info", cfg->log_level);
  }
  auto tls = tls::MakeClientContext(*key, cfg->controller_pin, cfg->controller_ca_file);
  if (!tls) {
    std::cerr << "muster-agent: " << tls.message() << "\n";
    return 2;
  }
  SystemProcessRunner runner;
  auto ops = MakeNixSystem(*cfg, runner);
  Agent agent(*cfg, *key, *tls, std::move(ops), runner, NowMs);
  // Signals: a small thread waits for them so the agent can stop cleanly.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread sig_thread([&] {
    int sig = 0;
    sigwait(&set, &sig);
    spdlog::info("signal {}: stopping", sig);
    agent.Stop();
  });
  sig_thread.detach();
  return agent.Run();
}
