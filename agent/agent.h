// The agent: one link to the controller (I/O thread) and one deploy worker.
//
// The I/O thread receives deploys, verifies them (signature, machine, number,
// vars hash, vars box) and hands accepted ones to the worker. The worker drives
// the lifecycle state machine step by step, persisting the record before each
// step and reporting every transition. Reports made while offline are replaced
// by the newest one and delivered after the next hello.
#pragma once

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "agent/config.h"
#include "agent/link.h"
#include "agent/state.h"
#include "agent/substituter.h"
#include "agent/system_ops.h"
#include "common/crypto.h"
#include "common/http_server.h"
#include "common/preview.h"
#include "common/process.h"
#include "common/protocol.h"

namespace muster {

class Agent {
 public:
  using Clock = std::function<std::int64_t()>;  // unix ms

  Agent(AgentConfig config, SecretKey key, std::shared_ptr<boost::asio::ssl::context> tls,
        std::unique_ptr<SystemOps> ops, ProcessRunner& runner, Clock clock);
  ~Agent();

  // Loads the state, resumes an interrupted deploy and serves until Stop().
  // Returns a process exit code.
  int Run();
  void Stop();  // thread-safe

 private:
  void EnrollIfNeeded();

  // I/O thread.
  void OnOpen();
  void OnMessage(const std::string& text);
  void OnDeploy(const proto::Deploy& d);
  // A signed preview request: verified here, run by the worker between
  // deploys (or while one is staged); the answer is a preview-report.
  void OnPreview(const proto::Preview& p);
  void SendPreviewReport(proto::PreviewReport r);
  void SendHello();
  void FlushReports();
  void QueueReportLocked(const proto::StatusReport& r);
  void FlushLogs();
  void ArmLogTimer();

  // Worker thread. WorkOnce takes or continues one deploy step; false when stopping.
  void WorkerLoop();
  bool WorkOnce();
  void RunStep(DeployRecord& r, Step step);
  StepOutcome Perform(DeployRecord& r, Step step);
  // Every change to r (part of state_) is made under mu_: the I/O thread may
  // be saving state_ at the same moment.
  void SetKind(DeployRecord& r, Kind kind);
  // An activation the previous agent left running: waits for its result
  // (interruptible) and records it as Resume() decides.
  void ResumeActivation(DeployRecord& r);
  // Start-up: a generation that succeeded needing a reboot, now booted (a new
  // boot id, and no reboot required any more), says so.
  void NoteBootedInto(DeployRecord& r);
  // Schedule "window": waits (phase staged) for a maintenance window; fails
  // when a newer generation arrives first.
  StepOutcome AwaitWindow(DeployRecord& r);
  // Worker: runs the queued preview, if any (mu_ not held).
  void RunQueuedPreview();
  StepOutcome Confirm(DeployRecord& r);
  StepOutcome Rollback(DeployRecord& r);
  // Saves state_; on failure logs it and remembers the error in persist_error_
  // (cleared by the next successful save) so that no step that changes the
  // system starts from a state that is not on disk.
  void Persist();
  // Once r is final and its vars need no restoring, deletes the previous vars
  // kept for a rollback.
  void DiscardPreviousVarsIfFinal(const DeployRecord& r);
  void Report(const DeployRecord& r);
  void Log(std::int64_t generation, const std::string& stream, const std::string& line);
  std::string Tag(const DeployRecord& r, const char* what) const;
  proto::HostFacts Facts();
  std::string RenderMetrics();

  AgentConfig cfg_;
  SecretKey key_;
  std::shared_ptr<boost::asio::ssl::context> tls_;
  std::unique_ptr<SystemOps> ops_;
  ProcessRunner& runner_;
  Clock clock_;
  LifecyclePolicy policy_;

  boost::asio::io_context ioc_;
  std::unique_ptr<Link> link_;
  std::unique_ptr<Substituter> substituter_;  // the controller's cache, during a realise
  boost::asio::steady_timer log_timer_;

  std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  AgentState state_;
  std::optional<DeployRecord> pending_;  // accepted, waiting for the worker
  std::optional<std::pair<std::string, Manifest>> queued_preview_;  // id, verified request
  bool preview_running_ = false;
  PreviewReplayGuard preview_guard_;
  std::deque<proto::StatusReport> outbox_status_;  // reports not yet sent (bounded)
  std::deque<proto::LogLines> outbox_logs_;
  std::size_t outbox_log_lines_ = 0;
  std::size_t outbox_log_bytes_ = 0;  // line bytes in outbox_logs_.back()
  std::uint64_t next_seq_ = 1;
  std::uint64_t acked_seq_ = 0;
  std::uint64_t confirm_floor_ = 0;  // acks above this prove post-activation contact
  // So does a welcome on a session made after activation (the report sent
  // just before a controller died is never acked; its successor welcomes).
  std::uint64_t confirm_connections_ = 0;
  bool welcomed_ = false;
  std::uint64_t connections_ = 0;  // sessions that reached "welcome"
  std::uint64_t disconnects_ = 0;
  std::map<std::string, std::uint64_t> outcomes_;  // final phase → deploys
  std::unique_ptr<HttpServer> metrics_;
  bool stopping_ = false;
  bool resume_activation_ = false;  // worker only, after Run() set it
  std::string persist_error_;       // why the last Persist() failed; empty when it succeeded
  std::thread worker_;
};

}  // namespace muster
