// muster-loadgen: simulated agents, bulk registration, fan-out publishing and
// the in-process handshake baseline. See bench/run.sh and docs/BENCHMARKS.md.
//
//   register  --state-dir DIR --count N       machines bench-000000… and the bench operator
//   agent-key --index I --out PATH            the key of simulated agent I (for a real agent)
//   operator-key --out PATH                   the bench operator's key (for the muster CLI)
//   baseline  [--threads T] [--seconds S]     mTLS handshakes per second, in memory
//   run       --state-dir DIR --port P --count N [--stages a,b,…] [--idle S] [--publish]
//             [--restart-cmd CMD --controller-pid PID] [--json FILE] [--check]
//
// `run` prints one JSON object with every figure and exits 1 when --check is
// given and anything went wrong (an unexpected failure, an agent that was not
// connected, notified or acknowledged).
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "bench/baseline.h"
#include "bench/fetch.h"
#include "bench/keys.h"
#include "bench/publisher.h"
#include "bench/sim.h"
#include "common/crypto.h"
#include "common/fsutil.h"
#include "common/manifest.h"
#include "common/roster.h"
#include "controller/store.h"

using namespace muster;
using namespace muster::bench;
using nlohmann::json;

namespace {

std::int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void SleepMs(std::int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

double Sec(std::int64_t ns) { return static_cast<double>(ns) / 1e9; }

// Raises the open-file limit (root may raise the hard limit up to fs.nr_open).
void RaiseNoFile(rlim_t want) {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur >= want) return;
  rlimit nl{want, std::max(want, rl.rlim_max)};
  if (setrlimit(RLIMIT_NOFILE, &nl) != 0) {
    nl = {rl.rlim_max, rl.rlim_max};
    (void)setrlimit(RLIMIT_NOFILE, &nl);
    std::cerr << "loadgen: could only raise RLIMIT_NOFILE to " << rl.rlim_max << "\n";
  }
}

struct ProcSample {
  bool ok = false;
  std::int64_t at_ns = 0;
  std::int64_t rss_kib = 0;
  std::int64_t hwm_kib = 0;
  double cpu_s = 0;  // utime + stime
};

ProcSample Sample(int pid) {
  ProcSample s;
  s.at_ns = NowNs();
  std::string base = pid > 0 ? "/proc/" + std::to_string(pid) : "/proc/self";
  std::ifstream st(base + "/status");
  std::string line;
  while (std::getline(st, line)) {
    if (line.rfind("VmRSS:", 0) == 0) s.rss_kib = std::stoll(line.substr(6));
    if (line.rfind("VmHWM:", 0) == 0) s.hwm_kib = std::stoll(line.substr(6));
  }
  std::ifstream sf(base + "/stat");
  std::string all((std::istreambuf_iterator<char>(sf)), std::istreambuf_iterator<char>());
  auto rp = all.rfind(')');
  if (rp == std::string::npos) return s;
  std::istringstream rest(all.substr(rp + 2));
  std::string field;
  std::vector<std::string> f;
  while (rest >> field) f.push_back(field);
  if (f.size() < 13) return s;
  // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
  double tck = static_cast<double>(sysconf(_SC_CLK_TCK));
  s.cpu_s = (std::stod(f[11]) + std::stod(f[12])) / tck;
  s.ok = s.rss_kib > 0;
  return s;
}

double TimevalSec(const timeval& t) {
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
}

json Percentiles(std::vector<double> v) {
  if (v.empty()) return json{{"n", 0}};
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    size_t k = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
    return v[std::min(k, v.size() - 1)];
  };
  return {
      {"n", v.size()}, {"p50", at(0.5)}, {"p90", at(0.9)}, {"p99", at(0.99)}, {"max", v.back()}};
}

int RegisterInto(const std::string& db, std::uint32_t count);

// Registration writes one durable row per machine (an fsync each). Before the
// controller starts, the same SQLite file can be filled on tmpfs and moved back:
// the result is identical and 50,000 machines take seconds instead of minutes.
int CmdRegister(const std::string& dir, std::uint32_t count, bool direct) {
  namespace fs = std::filesystem;
  fs::path db = fs::path(dir) / "muster.db";
  std::error_code ec;
  if (direct || !fs::is_directory("/dev/shm") || !fs::exists(db) ||
      fs::exists(db.string() + "-wal")) {
    return RegisterInto(db.string(), count);
  }
  char tmpl[] = "/dev/shm/muster-register.XXXXXX";
  if (!mkdtemp(tmpl)) return RegisterInto(db.string(), count);
  fs::path tmp = fs::path(tmpl) / "muster.db";
  fs::copy_file(db, tmp, ec);
  int rc = ec ? RegisterInto(db.string(), count) : RegisterInto(tmp.string(), count);
  if (!ec && rc == 0 && fs::exists(tmp.string() + "-wal")) {
    std::cerr << "loadgen: the registered store was not checkpointed; nothing was moved\n";
    rc = 1;
  }
  if (!ec && rc == 0) {
    fs::path staged = db.string() + ".register";
    fs::copy_file(tmp, staged, fs::copy_options::overwrite_existing, ec);
    if (!ec) {
      int fd = ::open(staged.c_str(), O_RDONLY);
      if (fd >= 0) {
        (void)::fsync(fd);
        ::close(fd);
      }
      fs::permissions(staged, fs::status(db).permissions(), ec);
      fs::rename(staged, db, ec);
    }
    if (ec) {
      std::cerr << "loadgen: cannot move the registered store into place: " << ec.message() << "\n";
      rc = 1;
    }
  }
  fs::remove_all(tmpl, ec);
  return rc;
}

int RegisterInto(const std::string& db, std::uint32_t count) {
  auto store = OpenSqliteStore(db);
  if (!store) {
    std::cerr << "loadgen: " << store.message() << "\n";
    return 1;
  }
  std::int64_t t0 = NowNs();
  auto op = OperatorKey();
  bool have_op = false;
  for (const auto& o : (*store)->ListOperators()) have_op |= o.name == kOperatorName;
  if (!have_op) {
    if (auto st = (*store)->AddOperator({kOperatorName, op.public_key().ToText(), UnixMs()}); !st) {
      std::cerr << "loadgen: " << st.message() << "\n";
      return 1;
    }
  }
  std::uint32_t added = 0, present = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    MachineRecord m;
    m.name = AgentName(i);
    m.key = AgentKey(i).public_key().ToText();
    m.tags = {"bench"};
    m.created_at = UnixMs();
    // Signed like 'muster machine add' signs, so that 'muster publish --all'
    // with the bench operator key resolves these machines.
    RosterEntry e;
    e.machine = m.name;
    e.key = m.key;
    e.tags = m.tags;
    e.signed_at = m.created_at;
    m.roster = EncodeSignedRosterEntry(SignRosterEntry(e, op));
    auto st = (*store)->AddMachine(m);
    if (st) {
      ++added;
    } else if (st.message().find("already registered") != std::string::npos) {
      ++present;
    } else {
      std::cerr << "loadgen: " << st.message() << "\n";
      return 1;
    }
  }
  std::cout << json{{"registered", added},
                    {"alreadyPresent", present},
                    {"operator", kOperatorName},
                    {"operatorKey", op.public_key().ToText()},
                    {"seconds", Sec(NowNs() - t0)}}
                   .dump()
            << "\n";
  return 0;
}

struct RunArgs {
  std::string state_dir;
  std::string pin;
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::uint16_t port2 = 0;
  int controller_pid2 = 0;
  std::uint32_t count = 0;
  int threads = 1;
  std::uint32_t inflight = 1000;
  std::string stages;
  double idle = 0;
  double settle = 5;
  int ping_interval = 50;
  int controller_pid = 0;
  bool publish = false;
  int publish_timeout = 120;
  double publish_rate = 0;
  std::string restart_cmd;
  std::string publish_cmd;
  int waves = 0;
  std::string pid_file;
  int reconnect_timeout = 300;
  int stage_timeout = 600;
  std::string json_out;
  bool check = false;
  bool defer_agent_work = false;
};

int CmdRun(const RunArgs& a) {
  std::string pin = a.pin;
  if (pin.empty()) {
    auto key = LoadSecretKey(a.state_dir + "/controller.key");
    if (!key) {
      std::cerr << "loadgen: " << key.message() << "\n";
      return 2;
    }
    pin = key->public_key().Fingerprint();
  }
  RaiseNoFile(static_cast<rlim_t>(a.count) * 2 + 4096);
  SimOptions so;
  so.host = a.host;
  so.port = a.port;
  so.port2 = a.port2;
  so.pin = pin;
  so.operator_key = OperatorKey().public_key();
  so.count = a.count;
  so.threads = a.threads;
  so.max_inflight = a.inflight;
  so.ping_interval = std::chrono::seconds(a.ping_interval);
  so.idle_timeout = std::chrono::seconds(a.ping_interval * 3);
  so.defer_agent_work = a.defer_agent_work;

  std::vector<std::uint32_t> stages;
  {
    std::stringstream ss(a.stages);
    std::string part;
    while (std::getline(ss, part, ',')) {
      if (!part.empty())
        stages.push_back(
            std::min<std::uint32_t>(static_cast<std::uint32_t>(std::stoul(part)), a.count));
    }
    if (stages.empty()) stages.push_back(a.count);
  }

  json out;
  out["count"] = a.count;
  out["threads"] = a.threads;
  out["inflight"] = a.inflight;
  out["pingInterval"] = a.ping_interval;
  out["deferAgentWork"] = a.defer_agent_work;
  bool ok = true;
  auto fail = [&](const std::string& why) {
    ok = false;
    out["failures"].push_back(why);
    std::cerr << "loadgen: " << why << "\n";
  };

  int pid = a.controller_pid;
  ProcSample before = Sample(pid);
  ProcSample self_before = Sample(0);
  out["controllerRssBeforeKiB"] = before.rss_kib;
  Simulator sim(so);
  sim.Start();
  const auto& c = sim.counters();
  std::uint32_t prev = 0;
  for (std::uint32_t n : stages) {
    json st;
    st["agents"] = n;
    ProcSample s0 = Sample(pid);
    std::int64_t t0 = NowNs();
    sim.SetTarget(n);
    std::int64_t deadline = t0 + static_cast<std::int64_t>(a.stage_timeout) * 1000000000;
    while (c.open.load() < static_cast<std::int64_t>(n) && NowNs() < deadline) SleepMs(5);
    std::int64_t t1 = NowNs();
    ProcSample s1 = Sample(pid);
    if (c.open.load() < static_cast<std::int64_t>(n)) {
      fail("stage " + std::to_string(n) + ": only " + std::to_string(c.open.load()) +
           " agents connected within " + std::to_string(a.stage_timeout) + " s");
    }
    std::vector<double> lat;
    std::int64_t last_welcome = 0;
    for (std::uint32_t i = prev; i < n; ++i) {
      if (sim.WelcomeNs(i) && sim.TcpNs(i))
        lat.push_back(Sec(sim.WelcomeNs(i) - sim.TcpNs(i)) * 1000);
      last_welcome = std::max(last_welcome, sim.WelcomeNs(i));
    }
    double secs = Sec((last_welcome ? last_welcome : t1) - t0);
    st["storm"] = {
        {"newAgents", n - prev},
        {"seconds", secs},
        {"handshakesPerSecond", secs > 0 ? (n - prev) / secs : 0},
        {"handshakeMs", Percentiles(lat)},
        {"controllerCpuSeconds", s1.cpu_s - s0.cpu_s},
        {"controllerCpuPercentOfOneCore", secs > 0 ? (s1.cpu_s - s0.cpu_s) / secs * 100 : 0}};
    prev = n;
    if (a.idle > 0) {
      SleepMs(static_cast<std::int64_t>(a.settle * 1000));
      ProcSample i0 = Sample(pid);
      std::uint64_t pings0 = c.pings_sent.load(), pongs0 = c.pongs_sent.load();
      SleepMs(static_cast<std::int64_t>(a.idle * 1000));
      ProcSample i1 = Sample(pid);
      ProcSample self = Sample(0);
      double wall = Sec(i1.at_ns - i0.at_ns);
      st["idle"] = {
          {"seconds", wall},
          {"connected", c.open.load()},
          {"controllerRssKiB", i1.rss_kib},
          {"controllerRssPerAgentKiB",
           n ? static_cast<double>(i1.rss_kib - before.rss_kib) / n : 0},
          {"controllerCpuPercentOfOneCore", wall > 0 ? (i1.cpu_s - i0.cpu_s) / wall * 100 : 0},
          {"agentPingsSent", c.pings_sent.load() - pings0},
          {"controllerPingsAnswered", c.pongs_sent.load() - pongs0},
          {"loadgenRssKiB", self.rss_kib},
          {"loadgenRssPerAgentKiB",
           n ? static_cast<double>(self.rss_kib - self_before.rss_kib) / n : 0}};
      if (c.open.load() < static_cast<std::int64_t>(n)) fail("agents were lost while idle");
    }
    std::cerr << "loadgen: stage " << st.dump() << "\n";
    out["stages"].push_back(st);
  }

  std::uint32_t n = stages.back();
  if (a.publish) {
    // Newer than any earlier bench generation (one number per second) and
    // within the ceiling for the signing time (CheckGenerationNumber).
    std::int64_t gen = GenerationCeiling(static_cast<std::int64_t>(std::time(nullptr)));
    sim.TrackGeneration(gen);
    PublishOptions po;
    po.host = a.host;
    po.port = a.port;
    po.pin = pin;
    po.count = n;
    po.generation = gen;
    po.toplevel = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-bench";
    po.timeout = std::chrono::seconds(a.publish_timeout);
    po.rate = a.publish_rate;
    ProcSample p0 = Sample(pid);
    PublishResult pr = PublishAll(po);
    if (!pr.error.empty()) fail("publish: " + pr.error);
    std::int64_t deadline = NowNs() + static_cast<std::int64_t>(a.publish_timeout) * 1000000000;
    auto acked = [&] {
      std::uint32_t k = 0;
      for (std::uint32_t i = 0; i < n; ++i) k += sim.AckNs(i) != 0;
      return k;
    };
    while (acked() < n && NowNs() < deadline) SleepMs(10);
    ProcSample p1 = Sample(pid);
    std::vector<double> notify, ack, resp, rack;
    // Each agent's deploy after the controller answered its publish (the
    // publish was stored and announced): with --port2, by the controller the
    // agent is on (agent i's thread is i % threads; odd threads on port2).
    std::vector<double> after_accept[2];
    std::int64_t last_notify = 0, last_ack = 0, last_resp = 0;
    std::uint32_t wrong = 0;
    for (std::uint32_t i = 0; i < n; ++i) {
      if (sim.NotifyNs(i) && pr.response_ns[i]) {
        bool second = a.port2 != 0 && (i % static_cast<std::uint32_t>(a.threads)) % 2 == 1;
        after_accept[second ? 1 : 0].push_back(Sec(sim.NotifyNs(i) - pr.response_ns[i]) * 1000);
      }
      if (sim.NotifyNs(i)) notify.push_back(Sec(sim.NotifyNs(i) - pr.start_ns) * 1000);
      if (sim.AckNs(i)) ack.push_back(Sec(sim.AckNs(i) - pr.start_ns) * 1000);
      if (sim.ReceivedAckNs(i)) rack.push_back(Sec(sim.ReceivedAckNs(i) - pr.start_ns) * 1000);
      if (pr.response_ns[i]) resp.push_back(Sec(pr.response_ns[i] - pr.start_ns) * 1000);
      last_notify = std::max(last_notify, sim.NotifyNs(i));
      last_ack = std::max(last_ack, sim.AckNs(i));
      last_resp = std::max(last_resp, pr.response_ns[i]);
      wrong += sim.AppliedGeneration(i) != gen;
    }
    out["fanout"] = {{"agents", n},
                     {"generation", gen},
                     {"publishOk", pr.ok},
                     {"publishRefused", pr.failed},
                     {"notified", notify.size()},
                     {"acknowledged", ack.size()},
                     {"notifyMs", Percentiles(notify)},
                     {"receivedAckMs", Percentiles(rack)},
                     {"ackMs", Percentiles(ack)},
                     {"publishResponseMs", Percentiles(resp)},
                     {"publishesPerSecond", last_resp ? pr.ok / Sec(last_resp - pr.start_ns) : 0},
                     {"controllerCpuSeconds", p1.cpu_s - p0.cpu_s},
                     {"controllerRssKiB", p1.rss_kib}};
    if (a.port2 != 0) {
      out["fanout"]["notifyAfterAcceptMsByController"] = {
          {std::to_string(a.port), Percentiles(after_accept[0])},
          {std::to_string(a.port2), Percentiles(after_accept[1])}};
    } else {
      out["fanout"]["notifyAfterAcceptMs"] = Percentiles(after_accept[0]);
    }
    if (notify.size() != n || ack.size() != n || wrong != 0 || pr.ok != n) {
      fail("fan-out: " + std::to_string(notify.size()) + " notified, " +
           std::to_string(ack.size()) + " acknowledged, " + std::to_string(wrong) +
           " without the generation, of " + std::to_string(n));
    }
    std::cerr << "loadgen: fanout " << out["fanout"].dump() << "\n";
  }

  if (!a.publish_cmd.empty()) {
    // The way an operator reaches the fleet: one 'muster publish --all' (a
    // rollout), run as given. Times are from the command's start; "after
    // accepted" subtracts the moment the command returned (the controller had
    // stored the rollout and released its first wave by then).
    sim.TrackGeneration(1);
    ProcSample p0 = Sample(pid), q0 = Sample(a.controller_pid2);
    std::int64_t t0 = NowNs();
    pid_t child = fork();
    if (child == 0) {
      execl("/bin/sh", "sh", "-c", a.publish_cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    int status = 0;
    struct rusage ru {};
    (void)wait4(child, &status, 0, &ru);
    std::int64_t t_done = NowNs();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fail("--publish-cmd exited with status " + std::to_string(status));
    }
    std::int64_t deadline = NowNs() + static_cast<std::int64_t>(a.publish_timeout) * 1000000000;
    auto acked = [&] {
      std::uint32_t k = 0;
      for (std::uint32_t i = 0; i < n; ++i) k += sim.AckNs(i) != 0;
      return k;
    };
    while (acked() < n && NowNs() < deadline) SleepMs(5);
    ProcSample p1 = Sample(pid), q1 = Sample(a.controller_pid2);
    std::vector<double> notify, ack, notify_after, ack_after;
    // With --port2: agent i's thread is i % threads; odd threads on port2.
    std::vector<double> after_on[2];
    auto on_second = [&](std::uint32_t i) {
      return a.port2 != 0 && (i % static_cast<std::uint32_t>(a.threads)) % 2 == 1;
    };
    std::vector<std::int64_t> notify_ns, ack_ns, sent_ns;
    for (std::uint32_t i = 0; i < n; ++i) {
      if (std::int64_t t = sim.FinalSentNs(i)) sent_ns.push_back(t);
      if (std::int64_t t = sim.NotifyNs(i)) {
        notify.push_back(Sec(t - t0) * 1000);
        notify_after.push_back(Sec(t - t_done) * 1000);
        after_on[on_second(i) ? 1 : 0].push_back(Sec(t - t_done) * 1000);
        notify_ns.push_back(t);
      }
      if (std::int64_t t = sim.AckNs(i)) {
        ack.push_back(Sec(t - t0) * 1000);
        ack_after.push_back(Sec(t - t_done) * 1000);
        ack_ns.push_back(t);
      }
    }
    json f = {{"agents", n},
              {"command", a.publish_cmd},
              {"commandSeconds", Sec(t_done - t0)},
              {"commandCpuSeconds", TimevalSec(ru.ru_utime) + TimevalSec(ru.ru_stime)},
              {"commandMaxRssKiB", ru.ru_maxrss},
              {"notified", notify.size()},
              {"acknowledged", ack.size()},
              {"notifyMs", Percentiles(notify)},
              {"ackMs", Percentiles(ack)},
              {"notifyAfterCommandMs", Percentiles(notify_after)},
              {"ackAfterCommandMs", Percentiles(ack_after)},
              {"controllerCpuSeconds", p1.cpu_s - p0.cpu_s},
              {"controllerRssKiB", p1.rss_kib}};
    if (a.port2 != 0) {
      f["notifyAfterCommandMsByController"] = {{std::to_string(a.port), Percentiles(after_on[0])},
                                               {std::to_string(a.port2), Percentiles(after_on[1])}};
      f["controller2CpuSeconds"] = q1.cpu_s - q0.cpu_s;
      f["controller2RssKiB"] = q1.rss_kib;
    }
    if (a.waves > 0 && notify_ns.size() == n && ack_ns.size() == n) {
      // A rollout with --max-parallel W keeps W machines in flight: the
      // (W+k)-th release is enabled by the k-th final report. The gap between
      // the two is the controller's reaction time.
      std::sort(notify_ns.begin(), notify_ns.end());
      std::sort(ack_ns.begin(), ack_ns.end());
      std::vector<double> gaps;
      for (std::size_t k = 0; k + static_cast<std::size_t>(a.waves) < n; ++k) {
        gaps.push_back(Sec(notify_ns[k + static_cast<std::size_t>(a.waves)] - ack_ns[k]) * 1000);
      }
      f["maxParallel"] = a.waves;
      f["finalReportToNextReleaseMs"] = Percentiles(gaps);
      // The same from when the k-th final report was sent: the controller's
      // whole reaction (receipt, report commit, rollout step, push), which the
      // ack-based figure above leaves out (the ack follows the push).
      if (sent_ns.size() == n) {
        std::sort(sent_ns.begin(), sent_ns.end());
        std::vector<double> sent_gaps;
        for (std::size_t k = 0; k + static_cast<std::size_t>(a.waves) < n; ++k) {
          sent_gaps.push_back(Sec(notify_ns[k + static_cast<std::size_t>(a.waves)] - sent_ns[k]) *
                              1000);
        }
        f["finalReportSentToNextReleaseMs"] = Percentiles(sent_gaps);
      }
    }
    out["rollout"] = f;
    if (notify.size() != n || ack.size() != n) {
      fail("rollout: " + std::to_string(notify.size()) + " notified, " +
           std::to_string(ack.size()) + " acknowledged, of " + std::to_string(n));
    }
    std::cerr << "loadgen: rollout " << f.dump() << "\n";
  }

  if (!a.restart_cmd.empty()) {
    if (pid <= 0) {
      fail("--restart-cmd needs --controller-pid");
    } else {
      sim.ExpectDisconnects(true);
      std::int64_t t_kill = NowNs();
      ::kill(pid, SIGKILL);
      // The port is free once the process is gone (a zombie holds no sockets);
      // closing thousands of sockets takes the kernel a moment.
      for (int k = 0; k < 60000; ++k) {
        std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
        std::string s;
        std::getline(st, s);
        auto rp = s.rfind(')');
        if (!st || (rp != std::string::npos && s.size() > rp + 2 && s[rp + 2] == 'Z')) break;
        SleepMs(1);
      }
      std::int64_t t_restart = NowNs();
      pid_t child = -1;
      for (int attempt = 0; attempt < 100; ++attempt) {
        child = fork();
        if (child == 0) {
          setsid();
          execl("/bin/sh", "sh", "-c", a.restart_cmd.c_str(), static_cast<char*>(nullptr));
          _exit(127);
        }
        // A controller that cannot bind yet (the killed one's sockets are
        // still closing) exits within moments: start it again.
        int status = 0;
        bool exited = false;
        for (int k = 0; k < 20 && !exited; ++k) {
          SleepMs(100);
          exited = waitpid(child, &status, WNOHANG) == child;
        }
        if (!exited) break;
        std::cerr << "loadgen: restarted controller exited (status " << status << "); retrying\n";
      }
      pid = child;
      if (!a.pid_file.empty())
        (void)WriteFileAtomic(a.pid_file, std::to_string(child) + "\n", 0644);
      std::int64_t deadline = NowNs() + static_cast<std::int64_t>(a.reconnect_timeout) * 1000000000;
      auto back = [&] {
        std::uint32_t k = 0;
        for (std::uint32_t i = 0; i < n; ++i) k += sim.WelcomeNs(i) > t_kill;
        return k;
      };
      std::int64_t t_listening = 0;
      while (NowNs() < deadline) {
        if (!t_listening && c.tcp_ok.load() > 0) {
          // first TCP connection accepted by the new process
          for (std::uint32_t i = 0; i < n; ++i) {
            std::int64_t t = sim.TcpNs(i);
            if (t > t_restart && (!t_listening || t < t_listening)) t_listening = t;
          }
        }
        if (back() >= n) break;
        SleepMs(10);
      }
      std::uint32_t returned = back();
      std::vector<double> welcome_ms, hs_ms;
      std::int64_t first_tcp = 0, last_welcome = 0;
      std::vector<std::int64_t> times;
      for (std::uint32_t i = 0; i < n; ++i) {
        std::int64_t w = sim.WelcomeNs(i), t = sim.TcpNs(i);
        if (w <= t_kill) continue;
        welcome_ms.push_back(Sec(w - t_kill) * 1000);
        if (t > t_restart) {
          hs_ms.push_back(Sec(w - t) * 1000);
          if (!first_tcp || t < first_tcp) first_tcp = t;
        }
        last_welcome = std::max(last_welcome, w);
        times.push_back(w);
      }
      std::sort(times.begin(), times.end());
      // Peak rate over any 1 s window.
      double peak = 0;
      for (size_t lo = 0, hi = 0; hi < times.size(); ++hi) {
        while (times[hi] - times[lo] > 1000000000) ++lo;
        peak = std::max(peak, static_cast<double>(hi - lo + 1));
      }
      double busy = first_tcp && last_welcome ? Sec(last_welcome - first_tcp) : 0;
      ProcSample after = Sample(pid);
      out["reconnect"] = {
          {"agents", n},
          {"returned", returned},
          {"secondsToAllBack", Sec((last_welcome ? last_welcome : NowNs()) - t_kill)},
          {"restartToFirstAcceptMs", first_tcp ? Sec(first_tcp - t_restart) * 1000 : -1},
          {"welcomeAfterKillMs", Percentiles(welcome_ms)},
          {"handshakeMs", Percentiles(hs_ms)},
          {"meanRatePerSecond", busy > 0 ? returned / busy : 0},
          {"peakRatePerSecond", peak},
          {"controllerRssKiB", after.rss_kib},
          {"controllerCpuSeconds", after.cpu_s},
          {"expectedFailures", sim.ExpectedFailures()}};
      if (returned < n)
        fail("reconnect: only " + std::to_string(returned) + " of " + std::to_string(n) +
             " came back");
      sim.ExpectDisconnects(false);
      std::cerr << "loadgen: reconnect " << out["reconnect"].dump() << "\n";
    }
  }

  out["counters"] = {{"connects", c.connects.load()},
                     {"tcpOk", c.tcp_ok.load()},
                     {"tlsOk", c.tls_ok.load()},
                     {"welcomes", c.welcomes.load()},
                     {"disconnects", c.disconnects.load()},
                     {"deploys", c.deploys.load()},
                     {"verified", c.verified.load()},
                     {"refused", c.refused.load()},
                     {"reports", c.reports.load()},
                     {"acks", c.acks.load()},
                     {"finalAcks", c.final_acks.load()},
                     {"pingsSent", c.pings_sent.load()},
                     {"pongsSent", c.pongs_sent.load()}};
  out["errors"] = sim.Errors();
  out["loadgenRssKiB"] = Sample(0).rss_kib;
  if (sim.ErrorCount() > 0) fail(std::to_string(sim.ErrorCount()) + " unexpected failures");
  if (c.refused.load() > 0) fail("refused deploys");
  if (c.acks.load() != c.reports.load()) {
    // Reports sent right before a disconnect may go unanswered; outside a
    // reconnect storm every report must be acked.
    if (a.restart_cmd.empty())
      fail("reports " + std::to_string(c.reports.load()) + " but acks " +
           std::to_string(c.acks.load()));
  }
  sim.Stop();
  out["ok"] = ok;
  std::string text = out.dump(2);
  if (!a.json_out.empty()) (void)WriteFileAtomic(a.json_out, text + "\n", 0644);
  std::cout << text << "\n";
  return a.check && !ok ? 1 : 0;
}

}  // namespace

struct FetchArgs {
  std::string state_dir;
  std::uint16_t port = 0;
  std::uint32_t count = 200;
  std::string toplevel;
  std::string hashes;  // comma-separated store hashes of the closure
  int threads = 1;
  int controller_pid = 0;
  int timeout = 600;
  std::string json_out;
};

// Publishes toplevel to machines [0, count) (which authorises them to fetch
// its closure), then has them all fetch it at once.
int CmdFetch(const FetchArgs& a) {
  auto key = LoadSecretKey(a.state_dir + "/controller.key");
  if (!key) {
    std::cerr << "loadgen: " << key.message() << "\n";
    return 2;
  }
  std::string pin = key->public_key().Fingerprint();
  RaiseNoFile(static_cast<rlim_t>(a.count) * 2 + 4096);
  PublishOptions po;
  po.port = a.port;
  po.pin = pin;
  po.count = a.count;
  po.generation = GenerationCeiling(static_cast<std::int64_t>(std::time(nullptr)));
  po.toplevel = a.toplevel;
  PublishResult pr = PublishAll(po);
  if (!pr.error.empty() || pr.ok != a.count) {
    std::cerr << "loadgen: publish: " << pr.error << " (" << pr.ok << " of " << a.count << ")\n";
    return 1;
  }
  FetchOptions fo;
  fo.port = a.port;
  fo.pin = pin;
  fo.count = a.count;
  fo.threads = a.threads;
  fo.timeout = std::chrono::seconds(a.timeout);
  std::stringstream ss(a.hashes);
  for (std::string h; std::getline(ss, h, ',');)
    if (!h.empty()) fo.hashes.push_back(h);
  ProcSample c0 = Sample(a.controller_pid), l0 = Sample(0);
  FetchResult r = FetchAll(fo);
  ProcSample c1 = Sample(a.controller_pid), l1 = Sample(0);
  double wall = r.end_ns > r.start_ns ? Sec(r.end_ns - r.start_ns) : 0;
  double gib = static_cast<double>(r.bytes) / (1u << 30);
  json out = {{"machines", a.count},
              {"done", r.done},
              {"objects", fo.hashes.size() * 2},
              {"bytes", r.bytes},
              {"seconds", wall},
              {"GiBps", wall > 0 ? gib / wall : 0},
              {"controllerCpuSeconds", c1.cpu_s - c0.cpu_s},
              {"controllerCpuSecondsPerGiB", gib > 0 ? (c1.cpu_s - c0.cpu_s) / gib : 0},
              {"controllerPeakRssKiB", c1.hwm_kib},
              {"loadgenCpuSeconds", l1.cpu_s - l0.cpu_s},
              {"narsVerifiedByMachine0", r.verified},
              {"error", r.error}};
  std::cout << out.dump(2) << "\n";
  if (!a.json_out.empty()) (void)WriteFileAtomic(a.json_out, out.dump(2) + "\n", 0644);
  return r.error.empty() && r.done == a.count ? 0 : 1;
}

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  InitCrypto();
  CLI::App app{"muster-loadgen: simulated agents and fleet benchmarks"};
  app.require_subcommand(1);

  std::string dir;
  std::uint32_t count = 0;
  auto* reg = app.add_subcommand(
      "register", "register bench machines and the bench operator in a controller's store");
  reg->add_option("--state-dir", dir, "controller state directory")->required();
  reg->add_option("--count", count, "machines bench-000000 …")->required();
  bool direct = false;
  reg->add_flag("--direct", direct,
                "write the store in place (one fsync per machine) instead of via /dev/shm");

  std::uint32_t index = 0;
  std::string key_out;
  auto* ak = app.add_subcommand("agent-key", "write the key file of simulated agent INDEX");
  ak->add_option("--index", index)->required();
  ak->add_option("--out", key_out)->required();

  std::string op_key_out;
  auto* ok = app.add_subcommand("operator-key", "write the bench operator's key file");
  ok->add_option("--out", op_key_out)->required();

  FetchArgs fa;
  auto* fetch = app.add_subcommand(
      "fetch", "publish TOPLEVEL to COUNT machines, then have them fetch its closure at once");
  fetch->add_option("--state-dir", fa.state_dir, "controller state directory (for the pin)")
      ->required();
  fetch->add_option("--port", fa.port)->required();
  fetch->add_option("--count", fa.count)->capture_default_str();
  fetch->add_option("--toplevel", fa.toplevel)->required();
  fetch->add_option("--hashes", fa.hashes, "store hashes of the closure, comma-separated")
      ->required();
  fetch->add_option("--threads", fa.threads)->capture_default_str();
  fetch->add_option("--controller-pid", fa.controller_pid)->required();
  fetch->add_option("--timeout", fa.timeout, "seconds")->capture_default_str();
  fetch->add_option("--json", fa.json_out, "also write the results here");

  int bthreads = 0;
  double bseconds = 5;
  std::uint32_t bregistry = 10000;
  auto* base = app.add_subcommand("baseline", "in-memory mTLS handshakes per second");
  base->add_option("--threads", bthreads, "threads (default: one per core)");
  base->add_option("--seconds", bseconds)->capture_default_str();
  base->add_option("--registry", bregistry, "registered keys the server check looks up")
      ->capture_default_str();
  int btickets = -1;
  base->add_option("--tickets", btickets, "override the TLS 1.3 session tickets the server sends");

  RunArgs ra;
  auto* run = app.add_subcommand("run", "connect simulated agents and measure");
  run->add_option("--state-dir", ra.state_dir, "controller state directory (for the pin)");
  run->add_option("--pin", ra.pin, "controller pin instead of --state-dir");
  run->add_option("--host", ra.host)->capture_default_str();
  run->add_option("--port", ra.port)->required();
  run->add_option("--count", ra.count)->required();
  run->add_option("--threads", ra.threads)->capture_default_str();
  run->add_option("--inflight", ra.inflight, "concurrent first connection attempts")
      ->capture_default_str();
  run->add_option("--stages", ra.stages, "connect this many agents in turn, e.g. 1000,10000,50000");
  run->add_option("--idle", ra.idle, "seconds to hold each stage idle and measure")
      ->capture_default_str();
  run->add_option("--settle", ra.settle, "seconds to wait before an idle measurement")
      ->capture_default_str();
  run->add_option("--ping-interval", ra.ping_interval, "agent ping interval, seconds")
      ->capture_default_str();
  run->add_option("--controller-pid", ra.controller_pid, "sample this process's RSS and CPU");
  run->add_option("--port2", ra.port2,
                  "a second controller of the fleet: the agents of odd threads connect here");
  run->add_option("--controller-pid2", ra.controller_pid2, "the second controller, sampled too");
  run->add_flag("--publish", ra.publish, "publish one generation to every agent of the last stage");
  run->add_option("--publish-timeout", ra.publish_timeout)->capture_default_str();
  run->add_option("--publish-rate", ra.publish_rate,
                  "with --publish: publishes per second, paced (default: all at once)");
  run->add_option("--restart-cmd", ra.restart_cmd,
                  "SIGKILL the controller, run this (sh -c) and time the reconnect storm");
  run->add_option("--publish-cmd", ra.publish_cmd,
                  "run this (sh -c), e.g. 'muster publish --all …', and time the rollout");
  run->add_option("--max-parallel", ra.waves,
                  "the --max-parallel the command uses: measure final report → next release");
  run->add_option("--pid-file", ra.pid_file, "where to write the restarted controller's pid");
  run->add_option("--reconnect-timeout", ra.reconnect_timeout)->capture_default_str();
  run->add_option("--stage-timeout", ra.stage_timeout)->capture_default_str();
  run->add_option("--json", ra.json_out, "also write the results here");
  run->add_flag("--defer-agent-work", ra.defer_agent_work,
                "read every deploy that arrived before verifying any (agents on separate "
                "machines): notification times then measure the controller's push");
  run->add_flag("--check", ra.check,
                "exit 1 unless every agent connected, got its generation and acked it");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (reg->parsed()) return CmdRegister(dir, count, direct);
  if (ak->parsed()) {
    auto st = SaveSecretKey(AgentKey(index), key_out);
    if (!st) {
      std::cerr << "loadgen: " << st.message() << "\n";
      return 1;
    }
    std::cout << AgentName(index) << " " << AgentKey(index).public_key().ToText() << "\n";
    return 0;
  }
  if (ok->parsed()) {
    auto st = SaveSecretKey(OperatorKey(), op_key_out);
    if (!st) {
      std::cerr << "loadgen: " << st.message() << "\n";
      return 1;
    }
    std::cout << kOperatorName << " " << OperatorKey().public_key().ToText() << "\n";
    return 0;
  }
  if (fetch->parsed()) return CmdFetch(fa);
  if (base->parsed()) {
    int t = bthreads > 0 ? bthreads
                         : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    auto r = MeasureHandshakes(t, bseconds, bregistry, btickets);
    std::cout << json{{"threads", r.threads},
                      {"seconds", r.seconds},
                      {"handshakes", r.handshakes},
                      {"perSecond", r.per_second}}
                     .dump()
              << "\n";
    return 0;
  }
  if (run->parsed()) {
    if (ra.state_dir.empty() && ra.pin.empty()) {
      std::cerr << "loadgen: --state-dir or --pin is required\n";
      return 2;
    }
    return CmdRun(ra);
  }
  return 0;
}
