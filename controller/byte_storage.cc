#include "controller/byte_storage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/fsutil.h"

namespace fs = std::filesystem;

namespace muster {

bool ValidStorageKey(std::string_view key) {
  if (key.empty() || key.size() > 512 || key.front() == '/' || key.back() == '/') return false;
  std::size_t seg = 0;
  for (std::size_t i = 0; i <= key.size(); ++i) {
    if (i == key.size() || key[i] == '/') {
      std::string_view s = key.substr(seg, i - seg);
      if (s.empty() || s == "." || s == ".." || s.front() == '.') return false;
      seg = i + 1;
      continue;
    }
    char c = key[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

namespace {

std::string Errno(const std::string& what, const fs::path& p) {
  int e = errno;
  std::string s = what + " " + p.string() + ": " + std::strerror(e);
  if (e == ENOSPC || e == EDQUOT)
    s += std::string(" (") + kDiskFullNote + ": free space or lower the cache bound)";
  return s;
}

class FileByteStorage : public ByteStorage {
 public:
  explicit FileByteStorage(fs::path root) : root_(std::move(root)) {}

  Status Put(const std::string& key, std::string_view bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    fs::path p = root_ / key;
    if (auto st = MakeDirs(p.parent_path(), 0750); !st) return st;
    return WriteFileAtomic(p, bytes, 0640);
  }

  Result<std::string> Read(const std::string& key, std::uint64_t offset,
                           std::size_t max_bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    fs::path p = root_ / key;
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Err(Errno("cannot open", p));
    std::string out(max_bytes, '\0');
    std::size_t got = 0;
    while (got < max_bytes) {
      ssize_t k = ::pread(fd, out.data() + got, max_bytes - got, static_cast<off_t>(offset + got));
      if (k < 0 && errno == EINTR) continue;
      if (k < 0) {
        std::string e = Errno("cannot read", p);
        ::close(fd);
        return Err(e);
      }
      if (k == 0) break;
      got += static_cast<std::size_t>(k);
    }
    ::close(fd);
    out.resize(got);
    return out;
  }

  std::optional<std::uint64_t> Size(const std::string& key) override {
    if (!ValidStorageKey(key)) return std::nullopt;
    struct stat st {};
    if (::stat((root_ / key).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
    return static_cast<std::uint64_t>(st.st_size);
  }

  Status Remove(const std::string& key) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    fs::path p = root_ / key;
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) return Err(Errno("cannot remove", p));
    return Status::Ok();
  }

  std::vector<Entry> List(const std::string& prefix) override {
    std::vector<Entry> out;
    std::error_code ec;
    // Walk only the directory the prefix names ("staging/" → root/staging).
    fs::path dir = root_;
    if (auto slash = prefix.rfind('/'); slash != std::string::npos) {
      if (!ValidStorageKey(prefix.substr(0, slash))) return out;
      dir /= prefix.substr(0, slash);
    }
    for (auto it = fs::recursive_directory_iterator(dir, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (!it->is_regular_file(ec)) continue;
      std::string key = fs::relative(it->path(), root_, ec).string();
      if (ec || key.rfind(prefix, 0) != 0 || !ValidStorageKey(key)) continue;
      struct stat st {};
      if (::stat(it->path().c_str(), &st) != 0) continue;
      out.push_back({key, static_cast<std::uint64_t>(st.st_size), st.st_mtime});
    }
    return out;
  }

  Result<std::uint64_t> Append(const std::string& key, std::uint64_t offset,
                               std::string_view bytes) override {
    if (!ValidStorageKey(key)) return Err("invalid storage key '" + key + "'");
    fs::path p = root_ / key;
    if (auto st = MakeDirs(p.parent_path(), 0750); !st) return st.error();
    // Only the first chunk creates the object: a later one for an object that
    // is gone (discarded meanwhile) must not leave an empty one behind.
    int fd = ::open(p.c_str(), O_WRONLY | O_CLOEXEC | (offset == 0 ? O_CREAT : 0), 0640);
    if (fd < 0 && errno == ENOENT) {
      return Err("upload offset " + std::to_string(offset) +
                 " does not match the 0 bytes received so far; resume from 0");
    }
    if (fd < 0) return Err(Errno("cannot open", p));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      std::string e = Errno("cannot stat", p);
      ::close(fd);
      return Err(e);
    }
    auto size = static_cast<std::uint64_t>(st.st_size);
    if (size != offset) {
      ::close(fd);
      return Err("upload offset " + std::to_string(offset) + " does not match the " +
                 std::to_string(size) + " bytes received so far; resume from " +
                 std::to_string(size));
    }
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t k =
          ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
      if (k < 0 && errno == EINTR) continue;
      if (k < 0) {
        std::string e = Errno("cannot write", p);
        (void)::ftruncate(fd, static_cast<off_t>(offset));  // keep the old size
        ::close(fd);
        return Err(e);
      }
      done += static_cast<std::size_t>(k);
    }
    ::close(fd);
    return offset + bytes.size();
  }

  Status Promote(const std::string& staging_key, const std::string& to) override {
    if (!ValidStorageKey(staging_key) || !ValidStorageKey(to)) return Err("invalid storage key");
    fs::path from = root_ / staging_key;
    fs::path dest = root_ / to;
    if (auto st = MakeDirs(dest.parent_path(), 0750); !st) return st;
    if (auto st = FsyncPath(from); !st) return st;
    if (::rename(from.c_str(), dest.c_str()) != 0) return Err(Errno("cannot rename to", dest));
    return FsyncPath(dest.parent_path());
  }

 private:
  fs::path root_;
};

}  // namespace

Result<std::unique_ptr<ByteStorage>> OpenFileByteStorage(const std::string& root) {
  if (auto st = MakeDirs(root, 0750); !st) return st.error();
  return std::unique_ptr<ByteStorage>(new FileByteStorage(root));
}

}  // namespace muster
