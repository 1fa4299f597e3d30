// Running external programs: argv vectors only, never a shell string.
//
// One Run(RunOptions) entry point (Nix's runProgram) behind an interface, so
// tests can substitute a fake runner. The real runner forks, execs the absolute
// program path in its own process group with nothing but its three pipes as
// descriptors 0, 1 and 2 (every other descriptor of the daemon, such as its TLS
// connection or a listener, is closed in the child), streams output lines to a
// callback, keeps the tail of stderr for error messages, and kills the whole
// group when the timeout passes. Thread-safe: each call is independent.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace muster {

struct RunOptions {
  std::vector<std::string> argv;           // argv[0] is an absolute path
  std::map<std::string, std::string> env;  // added to (or replacing) the inherited ones
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  std::string cwd;                   // "" keeps the current directory
  std::string input;                 // written to stdin, then closed
  std::size_t max_output = 1 << 20;  // stdout kept in RunResult::out
  // Called for every complete line on stdout (is_stderr=false) or stderr (true).
  // Lines are the program's bytes, not necessarily UTF-8; a line longer than
  // 64 KiB arrives in pieces, cut between characters.
  std::function<void(bool is_stderr, const std::string& line)> on_line;
  // When set and it becomes true, Run returns within ~100 ms with
  // RunResult::detached: the program keeps running (in its own process group,
  // never signalled), its output is no longer read. For a daemon that stops
  // while a child must outlive it (an activation).
  const std::atomic<bool>* detach = nullptr;
  // When set, stdout is not split into lines nor kept in RunResult::out: every
  // piece read is passed as it is, in order (streaming a NAR of any size in
  // bounded memory). Returning false kills the program's process group (the
  // result then reports signal 9).
  std::function<bool(std::string_view bytes)> on_stdout;
};

struct RunResult {
  int exit_code = -1;   // valid when exited
  bool exited = false;  // false: killed by a signal or failed to start
  int signal = 0;
  bool timed_out = false;
  bool detached = false;    // left running because RunOptions::detach became true
  std::string out;          // stdout (up to max_output)
  std::string err_tail;     // last ~4 KiB of stderr, valid UTF-8 (bad bytes → U+FFFD)
  std::string start_error;  // set when the program could not be started

  bool ok() const { return exited && exit_code == 0; }
  // "exited with status 3: <stderr tail>" and similar, for error messages.
  std::string Describe() const;
};

class ProcessRunner {
 public:
  virtual ~ProcessRunner() = default;
  virtual RunResult Run(const RunOptions& options) = 0;
};

// The real runner (fork/exec/poll).
class SystemProcessRunner : public ProcessRunner {
 public:
  RunResult Run(const RunOptions& options) override;
};

// Marks fd close-on-exec so that no program a daemon starts inherits it
// (Boost.Asio opens and accepts sockets without SOCK_CLOEXEC). Returns false
// when fcntl fails (fd not open).
bool SetCloseOnExec(int fd);

// Finds an executable by name in dir (if set), then PATH, then the usual Nix,
// NixOS and nix-darwin locations. Returns its absolute path or "".
std::string FindProgram(const std::string& name, const std::string& dir = "");

// Renders argv for logs, quoting where needed. Never passed to a shell.
std::string ArgvToString(const std::vector<std::string>& argv);

}  // namespace muster
