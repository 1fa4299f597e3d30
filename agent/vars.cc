#include "agent/vars.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "common/fsutil.h"

namespace muster {

namespace fs = std::filesystem;

namespace {
constexpr const char* kHashFile = ".muster-vars-hash";

Result<uid_t> UserId(const std::string& name) {
  struct passwd* p = ::getpwnam(name.c_str());
  if (!p) return Err("vars name unknown user '" + name + "'");
  return p->pw_uid;
}
Result<gid_t> GroupId(const std::string& name) {
  struct group* g = ::getgrnam(name.c_str());
  if (!g) return Err("vars name unknown group '" + name + "'");
  return g->gr_gid;
}

Status WriteEntry(const fs::path& root, const VarsFile& f) {
  fs::path p = root / f.path;
  // Parents: 0700, created below root only (paths were validated).
  fs::path parent = p.parent_path();
  std::vector<fs::path> to_make;
  for (fs::path d = parent; d != root; d = d.parent_path()) to_make.push_back(d);
  for (auto it = to_make.rbegin(); it != to_make.rend(); ++it) {
    if (::mkdir(it->c_str(), 0700) != 0 && errno != EEXIST) {
      return Err("cannot create " + it->string() + ": " + std::strerror(errno));
    }
  }
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return Err("cannot create vars file " + f.path + ": " + std::strerror(errno));
  std::string_view data = f.content;
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      return Err("cannot write vars file " + f.path + ": " + std::strerror(e));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  if (::geteuid() == 0) {
    auto uid = UserId(f.owner);
    if (!uid) {
      ::close(fd);
      return Err("vars file " + f.path + ": " + uid.message());
    }
    auto gid = GroupId(f.group);
    if (!gid) {
      ::close(fd);
      return Err("vars file " + f.path + ": " + gid.message());
    }
    if (::fchown(fd, *uid, *gid) != 0) {
      int e = errno;
      ::close(fd);
      return Err("cannot chown vars file " + f.path + ": " + std::strerror(e));
    }
  }
  if (::fchmod(fd, f.mode) != 0 || ::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    return Err("cannot finish vars file " + f.path + ": " + std::strerror(e));
  }
  ::close(fd);
  return Status::Ok();
}

// An install cut short (the agent killed while staging) leaves its staging
// directory, secrets included, beside the target: remove such leftovers.
void RemoveStaleStaging(const fs::path& target) {
  const std::string prefix = "." + target.filename().string() + ".new-";
  std::vector<fs::path> stale;
  std::error_code ec;
  for (auto it = fs::directory_iterator(target.parent_path(), ec);
       !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string n = it->path().filename().string();
    if (n.size() == prefix.size() + 8 && n.compare(0, prefix.size(), prefix) == 0) {
      stale.push_back(it->path());
    }
  }
  for (const auto& p : stale) fs::remove_all(p, ec);
}

Status FsyncTree(const fs::path& root) {
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (it->is_directory()) {
      if (auto st = FsyncPath(it->path()); !st) return st;
    }
  }
  return FsyncPath(root);
}
}  // namespace

Result<VarsBundle> OpenVars(const SecretKey& key, const std::string& sealed_b64) {
  auto sealed = Base64Decode(sealed_b64);
  if (!sealed) return Err("vars are not valid base64");
  auto plain = key.OpenSealed(*sealed);
  if (!plain) return Err("vars: " + plain.message());
  auto bundle = DecodeVarsBundle(*plain);
  if (!bundle) return bundle.error();
  return bundle;
}

Status CheckVarsTarget(const VarsBundle& b, const std::string& vars_dir) {
  if (b.target.empty()) return Status::Ok();
  auto norm = [](std::string p) {
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    return p;
  };
  if (norm(b.target) == norm(vars_dir)) return Status::Ok();
  return Err("the vars are meant for " + b.target +
             " (the machine's secret store directory) but "
             "this agent installs vars into " +
             vars_dir + "; set varsDir to " + b.target +
             " (the clan service does so from the machine's secret store)");
}

Result<VarsInstallResult> InstallVars(const SecretKey& key, const std::string& sealed_b64,
                                      const std::string& vars_hash, const std::string& target) {
  auto bundle = OpenVars(key, sealed_b64);
  if (!bundle) return bundle.error();
  if (auto st = CheckVarsTarget(*bundle, target); !st) return st.error();
  fs::path t(target);
  RemoveStaleStaging(t);
  auto current_hash = ReadFile(t / kHashFile, 4096);
  if (current_hash && *current_hash == vars_hash + "\n") {
    return VarsInstallResult{false, bundle->files.size()};
  }
  if (auto st = MakeDirs(t.parent_path(), 0755); !st) return st.error();
  fs::path staged = StagingPathFor(t, "new");
  if (::mkdir(staged.c_str(), 0700) != 0) {
    return Err("cannot create staging directory " + staged.string() + ": " + std::strerror(errno));
  }
  auto cleanup = [&] {
    std::error_code ec;
    fs::remove_all(staged, ec);
  };
  for (const auto& f : bundle->files) {
    if (auto st = WriteEntry(staged, f); !st) {
      cleanup();
      return st.error();
    }
  }
  VarsFile marker;
  marker.path = kHashFile;
  marker.mode = 0400;
  marker.content = vars_hash + "\n";
  if (auto st = WriteEntry(staged, marker); !st) {
    cleanup();
    return st.error();
  }
  if (auto st = FsyncTree(staged); !st) {
    cleanup();
    return st.error();
  }
  // Keep the old content for a rollback: swap it out, then move it aside.
  fs::path previous = t.string() + ".muster-previous";
  std::error_code ec;
  fs::remove_all(previous, ec);
  bool existed = fs::exists(t, ec);
  if (auto st = ReplaceDirectoryAtomicKeep(staged, t, existed ? previous : fs::path()); !st) {
    cleanup();
    return st.error();
  }
  if (!existed) {
    // A rollback of the first install restores "nothing": an empty directory.
    ::mkdir(previous.c_str(), 0700);
  }
  return VarsInstallResult{true, bundle->files.size()};
}

Status RestoreVars(const std::string& target) {
  fs::path t(target);
  fs::path previous = t.string() + ".muster-previous";
  std::error_code ec;
  if (!fs::exists(previous, ec)) return Status::Ok();
  return ReplaceDirectoryAtomicKeep(previous, t, fs::path());
}

Status DiscardPreviousVars(const std::string& target) {
  fs::path t(target);
  fs::path previous = t.string() + ".muster-previous";
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(previous, ec))) return Status::Ok();
  fs::remove_all(previous, ec);
  if (ec) {
    return Err("cannot remove the previous vars " + previous.string() + ": " + ec.message() +
               "; remove it by hand");
  }
  return FsyncPath(previous.parent_path());
}

}  // namespace muster
