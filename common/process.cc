#include "common/process.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <sstream>

#include "common/utf8.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

extern char** environ;

namespace muster {

namespace {
constexpr std::size_t kErrTail = 4096;

// write() to the child's stdin without SIGPIPE if it has closed it: the signal
// is blocked for this thread around the write and one it raised is discarded,
// so the caller sees EPIPE instead of dying.
ssize_t WriteNoSigpipe(int fd, const char* data, std::size_t n) {
  sigset_t pipe_only, old, pending;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  sigemptyset(&pending);
  ::sigpending(&pending);
  bool was_pending = sigismember(&pending, SIGPIPE) == 1;
  ::pthread_sigmask(SIG_BLOCK, &pipe_only, &old);
  ssize_t k = ::write(fd, data, n);
  int e = errno;
  if (k < 0 && e == EPIPE && !was_pending) {
    const timespec zero{0, 0};
    while (::sigtimedwait(&pipe_only, nullptr, &zero) < 0 && errno == EINTR) {
    }
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  errno = e;
  return k;
}

void SplitLines(std::string& pending, const char* data, std::size_t n, bool is_stderr,
                const RunOptions& o) {
  constexpr std::size_t kMaxLine = 64 * 1024;
  pending.append(data, n);
  std::size_t pos;
  while ((pos = pending.find('\n')) != std::string::npos) {
    if (o.on_line) o.on_line(is_stderr, pending.substr(0, pos));
    pending.erase(0, pos + 1);
  }
  while (pending.size() > kMaxLine) {  // an endless line: flush it in pieces
    std::size_t cut = Utf8SplitPoint(pending, kMaxLine);
    if (o.on_line) o.on_line(is_stderr, pending.substr(0, cut));
    pending.erase(0, cut);
  }
}

// In the child between fork and exec (async-signal-safe calls only): makes
// sure that no descriptor from 3 up survives exec. `keep` (the exec-error
// pipe, itself close-on-exec) must stay usable until then. max_fd bounds the
// last-resort loop when neither close_range nor /proc is available.
void CloseInheritedDescriptors(int keep, int max_fd) {
#ifdef SYS_close_range
  // Linux >= 5.11: everything from 3 becomes close-on-exec.
  if (::syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) == 0) return;
  // Linux 5.9, 5.10: close all but keep now.
  auto k = static_cast<unsigned>(keep);
  if ((k <= 3 || ::syscall(SYS_close_range, 3U, k - 1, 0U) == 0) &&
      ::syscall(SYS_close_range, std::max(3U, k + 1), ~0U, 0U) == 0) {
    return;
  }
#endif
#ifdef SYS_getdents64
  int dir = ::open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    alignas(8) char buf[4096];
    for (;;) {
      long n = ::syscall(SYS_getdents64, dir, buf, sizeof buf);
      if (n <= 0) break;
      for (long off = 0; off < n;) {
        struct Entry {  // struct linux_dirent64
          std::uint64_t ino;
          std::int64_t off;
          unsigned short reclen;
          unsigned char type;
          char name[1];
        };
        const auto* e = reinterpret_cast<const Entry*>(buf + off);
        int fd = 0;
        bool number = e->name[0] != '\0';
        for (const char* c = e->name; *c != '\0'; ++c) {
          if (*c < '0' || *c > '9') {
            number = false;
            break;
          }
          fd = fd * 10 + (*c - '0');
        }
        if (number && fd > 2 && fd != dir) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
        off += e->reclen;
      }
    }
    ::close(dir);
    return;
  }
#endif
  for (int fd = 3; fd < max_fd; ++fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
}
}  // namespace

std::string RunResult::Describe() const {
  std::string s;
  if (!start_error.empty()) return "could not start: " + start_error;
  if (detached) {
    s = "was left running (the caller is stopping)";
  } else if (timed_out) {
    s = "timed out and was killed";
  } else if (exited) {
    s = "exited with status " + std::to_string(exit_code);
  } else {
    s = "was killed by signal " + std::to_string(signal);
  }
  std::string tail = err_tail;
  while (!tail.empty() && (tail.back() == '\n' || tail.back() == ' ')) tail.pop_back();
  if (!tail.empty()) s += ": " + TailUtf8(tail, 1500);
  return s;
}

bool SetCloseOnExec(int fd) {
  int flags = ::fcntl(fd, F_GETFD);
  return flags >= 0 && ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == 0;
}

std::string FindProgram(const std::string& name, const std::string& dir) {
  std::vector<std::string> dirs;
  if (!dir.empty()) dirs.push_back(dir);
  if (const char* path = std::getenv("PATH")) {
    std::stringstream ss(path);
    std::string d;
    while (std::getline(ss, d, ':')) {
      if (!d.empty() && d[0] == '/') dirs.push_back(d);
    }
  }
  for (const char* d : {"/run/current-system/sw/bin", "/nix/var/nix/profiles/default/bin",
                        "/run/wrappers/bin", "/usr/local/bin", "/usr/bin", "/bin"}) {
    dirs.push_back(d);
  }
  for (const auto& d : dirs) {
    std::string p = d + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

std::string ArgvToString(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) {
    if (!s.empty()) s += ' ';
    if (a.find_first_of(" \t\n'\"\\$") == std::string::npos && !a.empty()) {
      s += a;
    } else {
      s += '\'';
      for (char c : a) {
        if (c == '\'') {
          s += "'\\''";
        } else {
          s += c;
        }
      }
      s += '\'';
    }
  }
  return s;
}

RunResult SystemProcessRunner::Run(const RunOptions& o) {
  RunResult r;
  if (o.argv.empty() || o.argv[0].empty() || o.argv[0][0] != '/') {
    r.start_error = "program path must be absolute: '" + (o.argv.empty() ? "" : o.argv[0]) + "'";
    return r;
  }
  int out_pipe[2], err_pipe[2], in_pipe[2], exec_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 ||
      ::pipe2(in_pipe, O_CLOEXEC) != 0 || ::pipe2(exec_pipe, O_CLOEXEC) != 0) {
    r.start_error = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  // Build argv/envp before fork (no allocation in the child).
  std::vector<char*> argv;
  for (const auto& a : o.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::string> env_store;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv = *e;
    auto eq = kv.find('=');
    if (eq != std::string::npos && o.env.count(kv.substr(0, eq)) != 0) continue;
    env_store.push_back(std::move(kv));
  }
  for (const auto& [k, v] : o.env) env_store.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);
  int max_fd = 65536;
  if (rlimit rl{}; ::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    max_fd = static_cast<int>(std::min<rlim_t>(rl.rlim_cur, 1 << 20));
  }

  pid_t pid = ::fork();
  if (pid < 0) {
    r.start_error = std::string("fork: ") + std::strerror(errno);
    for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1], in_pipe[0], in_pipe[1],
                   exec_pipe[0], exec_pipe[1]}) {
      ::close(fd);
    }
    return r;
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    ::dup2(in_pipe[0], 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    CloseInheritedDescriptors(exec_pipe[1], max_fd);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    if (!o.cwd.empty() && ::chdir(o.cwd.c_str()) != 0) {
      int e = errno;
      (void)!::write(exec_pipe[1], &e, sizeof e);
      ::_exit(127);
    }
    ::execve(argv[0], argv.data(), envp.data());
    int e = errno;
    (void)!::write(exec_pipe[1], &e, sizeof e);
    ::_exit(127);
  }
  ::setpgid(pid, pid);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  ::close(in_pipe[0]);
  ::close(exec_pipe[1]);
  int exec_errno = 0;
  if (::read(exec_pipe[0], &exec_errno, sizeof exec_errno) == sizeof exec_errno) {
    r.start_error = o.argv[0] + ": " + std::strerror(exec_errno);
  }
  ::close(exec_pipe[0]);

  // Feed stdin (small inputs; written in the loop below to avoid deadlock).
  std::size_t in_off = 0;
  int in_fd = in_pipe[1];
  if (o.input.empty()) {
    ::close(in_fd);
    in_fd = -1;
  } else {
    ::fcntl(in_fd, F_SETFL, O_NONBLOCK);
  }
  auto deadline = std::chrono::steady_clock::now() + o.timeout;
  std::string out_pending, err_pending;
  std::string err_raw;  // the end of stderr as bytes; err_tail is made from it
  int fds_open = 2;
  bool out_open = true, err_open = true;
  char buf[65536];
  while (fds_open > 0) {
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      r.timed_out = true;
      ::kill(-pid, SIGKILL);
      break;
    }
    if (o.detach != nullptr && o.detach->load()) {
      r.detached = true;
      break;
    }
    int wait_ms = static_cast<int>(std::min<long long>(
        o.detach != nullptr ? 100 : 1000,
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1));
    pollfd p[3];
    int n = 0;
    int oi = -1, ei = -1, ii = -1;
    if (out_open) {
      p[n] = {out_pipe[0], POLLIN, 0};
      oi = n++;
    }
    if (err_open) {
      p[n] = {err_pipe[0], POLLIN, 0};
      ei = n++;
    }
    if (in_fd >= 0) {
      p[n] = {in_fd, POLLOUT, 0};
      ii = n++;
    }
    int rc = ::poll(p, static_cast<nfds_t>(n), wait_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      break;
    }
    auto drain = [&](int idx, int fd, bool is_err, bool& open) {
      if (idx < 0 || !(p[idx].revents & (POLLIN | POLLHUP | POLLERR))) return;
      ssize_t k = ::read(fd, buf, sizeof buf);
      if (k <= 0) {
        if (k < 0 && errno == EINTR) return;
        open = false;
        --fds_open;
        return;
      }
      auto len = static_cast<std::size_t>(k);
      if (is_err) {
        err_raw.append(buf, len);
        if (err_raw.size() > 2 * kErrTail) err_raw.erase(0, err_raw.size() - 2 * kErrTail);
        SplitLines(err_pending, buf, len, true, o);
      } else if (o.on_stdout) {
        if (!o.on_stdout(std::string_view(buf, len))) {
          ::kill(-pid, SIGKILL);
          open = false;
          --fds_open;
        }
      } else {
        if (r.out.size() < o.max_output)
          r.out.append(buf, std::min(len, o.max_output - r.out.size()));
        SplitLines(out_pending, buf, len, false, o);
      }
    };
    drain(oi, out_pipe[0], false, out_open);
    drain(ei, err_pipe[0], true, err_open);
    if (ii >= 0 && (p[ii].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t k = WriteNoSigpipe(in_fd, o.input.data() + in_off, o.input.size() - in_off);
      if (k > 0) in_off += static_cast<std::size_t>(k);
      if (k < 0 && errno != EAGAIN && errno != EINTR) in_off = o.input.size();
      if (in_off >= o.input.size()) {
        ::close(in_fd);
        in_fd = -1;
      }
    }
  }
  r.err_tail = TailUtf8(err_raw, kErrTail);
  if (in_fd >= 0) ::close(in_fd);
  ::close(out_pipe[0]);
  ::close(err_pipe[0]);
  if (o.on_line) {
    if (!out_pending.empty()) o.on_line(false, out_pending);
    if (!err_pending.empty()) o.on_line(true, err_pending);
  }
  if (r.detached) return r;  // never waited for: it outlives this call (and maybe us)
  int status = 0;
  // After the pipes close the program may still run (daemonised children keep
  // them open otherwise); wait up to the deadline, then kill.
  for (;;) {
    pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    if (o.detach != nullptr && o.detach->load()) {
      r.detached = true;
      return r;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      r.timed_out = true;
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    ::usleep(2000);
  }
  if (WIFEXITED(status)) {
    r.exited = r.start_error.empty();
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signal = WTERMSIG(status);
  }
  return r;
}

}  // namespace muster
