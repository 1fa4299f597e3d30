// Where the controller's binary cache keeps its bytes: named objects, small
// ones written whole, large ones staged by appending and then made visible in
// one step. The interface is what an object store offers (put, ranged get,
// multipart upload, delete, list), so one can replace the filesystem.
//
// Keys are relative names of [A-Za-z0-9._-] segments joined by '/'. An object
// is visible either whole or not at all. Thread-safe: calls may come from any
// thread; concurrent appends to one staging object are the caller's to avoid.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace muster {

class ByteStorage {
 public:
  struct Entry {
    std::string key;
    std::uint64_t size = 0;
    std::int64_t mtime = 0;  // unix seconds
  };
  virtual ~ByteStorage() = default;

  // Writes a whole object atomically (durable on return), replacing one that exists.
  virtual Status Put(const std::string& key, std::string_view bytes) = 0;
  // Up to max_bytes from offset; shorter at the end; fails if the key is absent.
  virtual Result<std::string> Read(const std::string& key, std::uint64_t offset,
                                   std::size_t max_bytes) = 0;
  virtual std::optional<std::uint64_t> Size(const std::string& key) = 0;
  // Removes an object (absent is fine).
  virtual Status Remove(const std::string& key) = 0;
  // Objects whose key starts with prefix.
  virtual std::vector<Entry> List(const std::string& prefix) = 0;

  // Staging (multipart upload): appends bytes to the staging object key when
  // its size is exactly offset (creating it at offset 0); returns the new
  // size. On failure (e.g. the disk is full) the object keeps its old size.
  virtual Result<std::uint64_t> Append(const std::string& key, std::uint64_t offset,
                                       std::string_view bytes) = 0;
  // Makes a staging object durable and visible as `to` in one step.
  virtual Status Promote(const std::string& staging_key, const std::string& to) = 0;

  // Whether a call waits for another machine (a database): callers on an
  // I/O thread then hand it to a worker.
  virtual bool Remote() const { return false; }
};

// A directory; staging objects and final objects are files under it, written
// with fsync and rename. Creates root (0750) if needed.
Result<std::unique_ptr<ByteStorage>> OpenFileByteStorage(const std::string& root);

// Tables in the fleet's PostgreSQL database (created by the store's
// migrations), shared by every controller using it; `connections` of its own.
Result<std::unique_ptr<ByteStorage>> OpenPostgresByteStorage(const std::string& conninfo,
                                                             std::size_t connections = 4);

// Part of every error message that means the disk (or quota) is full.
constexpr const char* kDiskFullNote = "the disk is full";

// True for a key the storage accepts.
bool ValidStorageKey(std::string_view key);

}  // namespace muster
