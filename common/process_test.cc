#include "common/process.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/testutil.h"
#include "common/utf8.h"

namespace muster {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using namespace std::chrono_literals;

RunResult Sh(const std::string& script, RunOptions o = {}) {
  o.argv = {"/bin/sh", "-c", script};
  if (o.timeout == std::chrono::milliseconds(std::chrono::minutes(10))) o.timeout = 10s;
  return SystemProcessRunner().Run(o);
}

TEST(SystemProcessRunner, ExitCodes) {
  struct Case {
    std::string script;
    int code;
  } cases[] = {{"exit 0", 0}, {"exit 1", 1}, {"exit 3", 3}, {"exit 255", 255}, {"true", 0}};
  for (const auto& c : cases) {
    RunResult r = Sh(c.script);
    EXPECT_TRUE(r.exited) << c.script;
    EXPECT_EQ(r.exit_code, c.code) << c.script;
    EXPECT_EQ(r.ok(), c.code == 0) << c.script;
    EXPECT_FALSE(r.timed_out);
    EXPECT_TRUE(r.start_error.empty()) << r.start_error;
    if (c.code != 0) {
      EXPECT_EQ(r.Describe(), "exited with status " + std::to_string(c.code));
    }
  }
}

TEST(SystemProcessRunner, CapturesStdoutExactly) {
  RunOptions o;
  o.argv = {FindProgram("echo"), "hello", "two words", "it's"};  // no /bin/echo in Nix's sandbox
  RunResult r = SystemProcessRunner().Run(o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out, "hello two words it's\n");
}

TEST(SystemProcessRunner, BoundsStdout) {
  RunOptions o;
  o.max_output = 100;
  RunResult r = Sh("i=0; while [ $i -lt 100 ]; do echo 0123456789; i=$((i+1)); done", o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out.size(), 100u);
  EXPECT_EQ(r.out.substr(0, 11), "0123456789\n");
}

TEST(SystemProcessRunner, KeepsStderrTailForMessages) {
  RunResult r = Sh("echo progress; echo 'error: path is not valid' >&2; exit 1");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.out, "progress\n");
  EXPECT_EQ(r.err_tail, "error: path is not valid\n");
  EXPECT_EQ(r.Describe(), "exited with status 1: error: path is not valid");

  // Only the last 4 KiB are kept, and Describe quotes at most 1500 bytes of them.
  RunResult big =
      Sh("i=0; while [ $i -lt 2000 ]; do echo line$i >&2; i=$((i+1)); done; echo LAST >&2; exit 2");
  EXPECT_EQ(big.exit_code, 2);
  EXPECT_EQ(big.err_tail.size(), 4096u);
  EXPECT_THAT(big.err_tail, ::testing::EndsWith("line1999\nLAST\n"));
  EXPECT_THAT(big.err_tail, ::testing::Not(HasSubstr("line1\n")));
  std::string d = big.Describe();
  EXPECT_THAT(d, StartsWith("exited with status 2: "));
  EXPECT_THAT(d, ::testing::EndsWith("LAST"));
  EXPECT_LE(d.size(), std::string("exited with status 2: ").size() + 1500);
}

TEST(SystemProcessRunner, OnLineSeesEveryLineOfBothStreams) {
  std::vector<std::pair<bool, std::string>> lines;
  RunOptions o;
  o.on_line = [&](bool is_stderr, const std::string& line) { lines.emplace_back(is_stderr, line); };
  RunResult r = Sh("printf 'a\\nb\\n\\n'; printf 'warn\\n' >&2; printf 'no-newline'", o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  std::vector<std::string> out, err;
  for (const auto& [is_err, l] : lines) (is_err ? err : out).push_back(l);
  EXPECT_THAT(out, ElementsAre("a", "b", "", "no-newline"));
  EXPECT_THAT(err, ElementsAre("warn"));
}

TEST(SystemProcessRunner, WritesInputToStdin) {
  RunOptions o;
  o.argv = {FindProgram("cat")};
  o.input = "line one\nline two";
  RunResult r = SystemProcessRunner().Run(o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out, o.input);

  // Larger than a pipe buffer in both directions: no deadlock.
  o.input.assign(600000, 'x');
  for (size_t i = 0; i < o.input.size(); i += 100) o.input[i] = '\n';
  r = SystemProcessRunner().Run(o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out, o.input);

  // No input: stdin is closed at once, so a reader sees EOF instead of hanging.
  o.input.clear();
  o.timeout = 5s;
  r = SystemProcessRunner().Run(o);
  EXPECT_TRUE(r.ok()) << r.Describe();
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.out, "");
}

TEST(SystemProcessRunner, EnvironmentAndWorkingDirectory) {
  testing::TempDir dir;
  RunOptions o;
  o.env = {{"MUSTER_TEST_VAR", "value with spaces"}, {"HOME", "/nonexistent-home"}};
  o.cwd = dir.path().string();
  RunResult r = Sh("echo \"$MUSTER_TEST_VAR|$HOME|$(pwd -P)\"", o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out, "value with spaces|/nonexistent-home|" +
                       std::filesystem::canonical(dir.path()).string() + "\n");

  o.cwd = (dir / "missing").string();
  r = Sh("true", o);
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.start_error, HasSubstr("No such file or directory"));
}

TEST(SystemProcessRunner, RefusesRelativeOrEmptyProgram) {
  struct Case {
    std::vector<std::string> argv;
  } cases[] = {{{"sh", "-c", "true"}}, {{"./sh"}}, {{""}}, {{}}};
  for (const auto& c : cases) {
    RunOptions o;
    o.argv = c.argv;
    RunResult r = SystemProcessRunner().Run(o);
    EXPECT_FALSE(r.ok());
    EXPECT_FALSE(r.exited);
    EXPECT_THAT(r.start_error, HasSubstr("program path must be absolute"));
    EXPECT_THAT(r.Describe(), StartsWith("could not start: "));
  }
}

TEST(SystemProcessRunner, ReportsProgramThatCannotStart) {
  testing::TempDir dir;
  RunOptions o;
  o.argv = {(dir / "no-such-program").string()};
  RunResult r = SystemProcessRunner().Run(o);
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(r.exited) << "a failed exec is not a program that exited";
  EXPECT_THAT(r.start_error, HasSubstr("No such file or directory"));
  EXPECT_THAT(r.Describe(), StartsWith("could not start: "));

  testing::Spit(dir / "not-executable", "#!/bin/sh\n");
  o.argv = {(dir / "not-executable").string()};
  r = SystemProcessRunner().Run(o);
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.start_error, HasSubstr("Permission denied"));
}

TEST(SystemProcessRunner, ReportsDeathBySignal) {
  RunResult r = Sh("kill -TERM $$; sleep 5");
  EXPECT_FALSE(r.exited);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.signal, SIGTERM);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.Describe(), "was killed by signal 15");
}

bool ProcessGone(pid_t pid) {
  // Gone, or a zombie waiting for a reaper that is not us.
  if (::kill(pid, 0) != 0) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto close = all.rfind(')');
  return close != std::string::npos && close + 2 < all.size() && all[close + 2] == 'Z';
}

TEST(SystemProcessRunner, TimeoutKillsTheWholeProcessGroup) {
  RunOptions o;
  o.timeout = 300ms;
  std::vector<std::string> lines;
  o.on_line = [&](bool, const std::string& l) { lines.push_back(l); };
  auto start = std::chrono::steady_clock::now();
  // The grandchild keeps stdout open, so only killing the group ends this early.
  RunResult r = Sh("sleep 30 & echo $!; wait", o);
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(r.timed_out);
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(r.exited);
  EXPECT_EQ(r.signal, SIGKILL);
  EXPECT_EQ(r.Describe(), "timed out and was killed");
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 5s);
  ASSERT_EQ(lines.size(), 1u);
  pid_t grandchild = static_cast<pid_t>(std::stol(lines[0]));
  ASSERT_GT(grandchild, 1);
  // SIGKILL is asynchronous: allow the kernel a moment to tear the process down.
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = ProcessGone(grandchild);
    if (!gone) ::usleep(10000);
  }
  EXPECT_TRUE(gone) << "grandchild " << grandchild << " survived the timeout";
}

TEST(ArgvToString, QuotesOnlyWhatNeedsIt) {
  struct Case {
    std::vector<std::string> argv;
    std::string want;
  } cases[] = {
      {{}, ""},
      {{"/run/current-system/sw/bin/nix-store", "--realise", "/nix/store/abc-x"},
       "/run/current-system/sw/bin/nix-store --realise /nix/store/abc-x"},
      {{"echo", "two words"}, "echo 'two words'"},
      {{"echo", ""}, "echo ''"},
      {{"echo", "it's"}, "echo 'it'\\''s'"},
      {{"echo", "$HOME", "a\"b", "back\\slash", "tab\there"},
       "echo '$HOME' 'a\"b' 'back\\slash' 'tab\there'"},
  };
  for (const auto& c : cases) EXPECT_EQ(ArgvToString(c.argv), c.want);
}

}  // namespace
}  // namespace muster

namespace muster {
namespace {

TEST(SystemProcessRunner, ProgramThatClosesStdinDoesNotKillTheCaller) {
  // The child closes stdin and stays alive; writing the rest of the input hits a
  // closed pipe, which must end the input for that run, not raise SIGPIPE in the
  // caller (daemons keep SIGPIPE's default action unless told otherwise).
  auto previous = ::signal(SIGPIPE, SIG_DFL);
  RunOptions o;
  o.argv = {"/bin/sh", "-c", "exec <&-; sleep 0.2; echo done"};
  o.input.assign(4 << 20, 'x');
  o.timeout = std::chrono::seconds(10);
  RunResult r = SystemProcessRunner().Run(o);
  ::signal(SIGPIPE, previous);
  EXPECT_TRUE(r.ok()) << r.Describe();
  EXPECT_EQ(r.out, "done\n");
  EXPECT_FALSE(r.timed_out);
  sigset_t pending;
  sigemptyset(&pending);
  ASSERT_EQ(::sigpending(&pending), 0);
  EXPECT_FALSE(sigismember(&pending, SIGPIPE)) << "no SIGPIPE left pending";
}

TEST(SystemProcessRunner, DetachLeavesTheProgramRunning) {
  // The agent stopping during an activation: Run returns at once and the
  // program carries on (it writes its file after the caller stopped waiting).
  testing::TempDir dir;
  const std::string marker = (dir.path() / "done").string();
  std::atomic<bool> detach{false};
  RunOptions o;
  o.argv = {"/bin/sh", "-c", "echo started; sleep 0.5; echo finished > " + marker};
  o.timeout = std::chrono::seconds(30);
  o.detach = &detach;
  std::vector<std::string> lines;
  o.on_line = [&](bool, const std::string& l) {
    lines.push_back(l);
    detach.store(true);  // as soon as it runs
  };
  auto t0 = std::chrono::steady_clock::now();
  RunResult r = SystemProcessRunner().Run(o);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 400ms) << "returned without waiting";
  EXPECT_TRUE(r.detached);
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.Describe(), HasSubstr("left running"));
  EXPECT_THAT(lines, ElementsAre("started"));
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!std::ifstream(marker) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  std::ifstream in(marker);
  std::string text;
  std::getline(in, text);
  EXPECT_EQ(text, "finished") << "the detached program ran to its end";
}

// fd → link target, from `ls -l /proc/self/fd/` run as the child itself, minus
// the descriptor ls opened to read that directory.
std::map<int, std::string> ChildDescriptors(const RunResult& r) {
  std::map<int, std::string> fds;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    auto arrow = line.find(" -> ");
    if (arrow == std::string::npos) continue;
    auto space = line.rfind(' ', arrow - 1);
    int fd = std::stoi(line.substr(space + 1, arrow - space - 1));
    std::string target = line.substr(arrow + 4);
    if (target.rfind("/proc/", 0) == 0 && target.size() > 3 &&
        target.compare(target.size() - 3, 3, "/fd") == 0) {
      continue;  // ls's own directory descriptor
    }
    fds[fd] = target;
  }
  return fds;
}

TEST(SystemProcessRunner, ChildInheritsNothingButItsThreePipes) {
  // What a daemon holds while it runs activation: a listening socket and an
  // open file, deliberately without close-on-exec (as Boost.Asio opens them).
  int sock = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(sock, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(sock, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(sock, 1), 0);
  testing::TempDir dir;
  std::ofstream(dir / "held").put('x');
  int file = ::open((dir / "held").c_str(), O_RDONLY);
  ASSERT_GE(file, 0);
  ASSERT_EQ(::fcntl(sock, F_GETFD) & FD_CLOEXEC, 0);
  ASSERT_EQ(::fcntl(file, F_GETFD) & FD_CLOEXEC, 0);

  std::string ls = FindProgram("ls");
  ASSERT_FALSE(ls.empty());
  RunOptions o;
  o.argv = {ls, "-l", "/proc/self/fd/"};
  o.input = "x";  // stdin is a pipe too
  RunResult r = SystemProcessRunner().Run(o);
  ::close(sock);
  ::close(file);
  ASSERT_TRUE(r.ok()) << r.Describe();
  auto fds = ChildDescriptors(r);
  std::vector<int> numbers;
  for (const auto& [fd, target] : fds) numbers.push_back(fd);
  EXPECT_THAT(numbers, ElementsAre(0, 1, 2)) << r.out;
  for (const auto& [fd, target] : fds) EXPECT_THAT(target, StartsWith("pipe:")) << fd;
}

TEST(SetCloseOnExec, MarksTheDescriptor) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  EXPECT_EQ(::fcntl(fds[0], F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_TRUE(SetCloseOnExec(fds[0]));
  EXPECT_NE(::fcntl(fds[0], F_GETFD) & FD_CLOEXEC, 0);
  ::close(fds[0]);
  ::close(fds[1]);
  EXPECT_FALSE(SetCloseOnExec(fds[0])) << "a closed descriptor";
}

TEST(SystemProcessRunner, StderrTailIsValidUtf8WhateverTheProgramWrote) {
  // 2000 euro signs (3 bytes each) then an invalid byte: the 4 KiB tail starts
  // inside a character and the 1500-byte quote in Describe too.
  RunResult r =
      Sh("i=0; while [ $i -lt 2000 ]; do printf '\\342\\202\\254' >&2; i=$((i+1)); done; "
         "printf ' bad \\377 end' >&2; exit 1");
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(IsValidUtf8(r.err_tail));
  EXPECT_LE(r.err_tail.size(), 4096u);
  EXPECT_GE(r.err_tail.size(), 4096u - 3);
  EXPECT_THAT(r.err_tail, StartsWith("\xE2\x82\xAC"));
  EXPECT_THAT(r.err_tail, ::testing::EndsWith(" bad \xEF\xBF\xBD end"));
  std::string d = r.Describe();
  EXPECT_TRUE(IsValidUtf8(d));
  EXPECT_THAT(d, StartsWith("exited with status 1: \xE2\x82\xAC"));
}

TEST(SystemProcessRunner, EndlessLineArrivesInPiecesCutBetweenCharacters) {
  std::vector<std::string> pieces;
  RunOptions o;
  o.on_line = [&](bool, const std::string& line) { pieces.push_back(line); };
  // 25000 euro signs, no newline: 75000 bytes, more than one 64 KiB piece.
  RunResult r = Sh("i=0; while [ $i -lt 25000 ]; do printf '\\342\\202\\254'; i=$((i+1)); done", o);
  ASSERT_TRUE(r.ok()) << r.Describe();
  ASSERT_GE(pieces.size(), 2u);
  std::string joined;
  for (const auto& p : pieces) {
    EXPECT_LE(p.size(), 64u * 1024);
    EXPECT_TRUE(IsValidUtf8(p)) << "piece of " << p.size() << " bytes";
    joined += p;
  }
  EXPECT_EQ(joined.size(), 75000u);
}

}  // namespace
}  // namespace muster
