#include "common/fsutil.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

namespace muster {

namespace fs = std::filesystem;

namespace {
std::string ErrnoText(int e) { return std::strerror(e); }

Status WriteAll(int fd, std::string_view data, const fs::path& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Err("cannot write " + path.string() + ": " + ErrnoText(errno));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}
}  // namespace

Result<std::string> ReadFile(const fs::path& path, std::size_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Err("cannot open " + path.string() + ": " + ErrnoText(errno));
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      return Err("cannot read " + path.string() + ": " + ErrnoText(e));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      return Err(path.string() + " is larger than " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return out;
}

Status FsyncPath(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Err("cannot open " + path.string() + " to sync: " + ErrnoText(errno));
  int rc = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (rc != 0 && e != EINVAL) return Err("cannot fsync " + path.string() + ": " + ErrnoText(e));
  return Status::Ok();
}

fs::path StagingPathFor(const fs::path& target, std::string_view tag) {
  unsigned int r = 0;
  if (::getrandom(&r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) r = std::random_device{}();
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, "%08x", r);
  fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  return parent / ("." + target.filename().string() + "." + std::string(tag) + "-" + suffix);
}

Status WriteFileAtomic(const fs::path& path, std::string_view content, mode_t mode) {
  fs::path tmp = StagingPathFor(path, "tmp");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return Err("cannot create " + tmp.string() + ": " + ErrnoText(errno));
  ::fchmod(fd, mode);  // not subject to umask
  Status st = WriteAll(fd, content, tmp);
  if (st && ::fsync(fd) != 0) st = Err("cannot fsync " + tmp.string() + ": " + ErrnoText(errno));
  ::close(fd);
  if (st && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = Err("cannot rename " + tmp.string() + " to " + path.string() + ": " + ErrnoText(errno));
  }
  if (!st) {
    ::unlink(tmp.c_str());
    return st;
  }
  return FsyncPath(path.parent_path().empty() ? fs::path(".") : path.parent_path());
}

Status WriteFileExclusive(const fs::path& path, std::string_view content, mode_t mode,
                          bool* existed) {
  if (existed != nullptr) *existed = false;
  fs::path tmp = StagingPathFor(path, "tmp");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return Err("cannot create " + tmp.string() + ": " + ErrnoText(errno));
  ::fchmod(fd, mode);  // not subject to umask
  Status st = WriteAll(fd, content, tmp);
  if (st && ::fsync(fd) != 0) st = Err("cannot fsync " + tmp.string() + ": " + ErrnoText(errno));
  ::close(fd);
  if (!st) {
    ::unlink(tmp.c_str());
    return st;
  }
  int e = 0;
  if (::syscall(SYS_renameat2, AT_FDCWD, tmp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) !=
      0) {
    e = errno;
    if (e == EINVAL || e == ENOSYS || e == ENOTSUP) {  // no RENAME_NOREPLACE here: link()
      e = ::link(tmp.c_str(), path.c_str()) == 0 ? 0 : errno;
    }
  }
  ::unlink(tmp.c_str());  // no-op after a rename; after link() the name at path remains
  if (e == EEXIST) {
    if (existed != nullptr) *existed = true;
    return Err(path.string() + " already exists; refusing to replace it");
  }
  if (e != 0) return Err("cannot create " + path.string() + ": " + ErrnoText(e));
  return FsyncPath(path.parent_path().empty() ? fs::path(".") : path.parent_path());
}

Status MakeDirs(const fs::path& path, mode_t mode) {
  if (path.empty()) return Status::Ok();
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return Status::Ok();
    return Err(path.string() + " exists and is not a directory");
  }
  if (path.has_parent_path() && path.parent_path() != path) {
    if (auto s = MakeDirs(path.parent_path(), mode); !s) return s;
  }
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST) {
    return Err("cannot create directory " + path.string() + ": " + ErrnoText(errno));
  }
  return Status::Ok();
}

Status ReplaceDirectoryAtomic(const fs::path& staged, const fs::path& target) {
  fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  struct stat st {};
  bool exists = ::lstat(target.c_str(), &st) == 0;
  if (exists) {
    long rc = ::syscall(SYS_renameat2, AT_FDCWD, staged.c_str(), AT_FDCWD, target.c_str(),
                        RENAME_EXCHANGE);
    if (rc != 0) {
      // File systems without RENAME_EXCHANGE: move the old one aside first.
      fs::path old = StagingPathFor(target, "old");
      if (::rename(target.c_str(), old.c_str()) != 0) {
        return Err("cannot move " + target.string() + " aside: " + ErrnoText(errno));
      }
      if (::rename(staged.c_str(), target.c_str()) != 0) {
        int e = errno;
        ::rename(old.c_str(), target.c_str());
        return Err("cannot move " + staged.string() + " into place: " + ErrnoText(e));
      }
      std::error_code ec;
      fs::remove_all(old, ec);
      return FsyncPath(parent);
    }
    // staged now holds the old content.
    if (auto s = FsyncPath(parent); !s) return s;
    std::error_code ec;
    fs::remove_all(staged, ec);
    return Status::Ok();
  }
  if (::rename(staged.c_str(), target.c_str()) != 0) {
    return Err("cannot move " + staged.string() + " to " + target.string() + ": " +
               ErrnoText(errno));
  }
  return FsyncPath(parent);
}

Status ReplaceDirectoryAtomicKeep(const fs::path& staged, const fs::path& target,
                                  const fs::path& keep_old_at) {
  if (keep_old_at.empty()) return ReplaceDirectoryAtomic(staged, target);
  fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  struct stat st {};
  if (::lstat(target.c_str(), &st) != 0) {
    if (::rename(staged.c_str(), target.c_str()) != 0) {
      return Err("cannot move " + staged.string() + " to " + target.string() + ": " +
                 ErrnoText(errno));
    }
    return FsyncPath(parent);
  }
  long rc =
      ::syscall(SYS_renameat2, AT_FDCWD, staged.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE);
  if (rc == 0) {
    if (::rename(staged.c_str(), keep_old_at.c_str()) != 0) {
      return Err("cannot keep old content at " + keep_old_at.string() + ": " + ErrnoText(errno));
    }
    return FsyncPath(parent);
  }
  if (::rename(target.c_str(), keep_old_at.c_str()) != 0) {
    return Err("cannot move " + target.string() + " aside: " + ErrnoText(errno));
  }
  if (::rename(staged.c_str(), target.c_str()) != 0) {
    int e = errno;
    ::rename(keep_old_at.c_str(), target.c_str());
    return Err("cannot move " + staged.string() + " into place: " + ErrnoText(e));
  }
  return FsyncPath(parent);
}

Result<std::string> ReadLink(const fs::path& path) {
  std::error_code ec;
  fs::path t = fs::read_symlink(path, ec);
  if (ec) return Err("cannot read link " + path.string() + ": " + ec.message());
  return t.string();
}

std::string HumanSize(std::int64_t b) {
  char buf[48];
  const double d = static_cast<double>(b);
  if (b >= (std::int64_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f GiB", d / (1 << 30));
  } else if (b >= (1 << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", d / (1 << 20));
  } else if (b >= 1024) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", d / 1024);
  } else {
    std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  }
  return buf;
}

}  // namespace muster
