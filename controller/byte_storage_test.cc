// ByteStorage's contract, run against each backend (a directory, and the
// fleet's PostgreSQL database), and a binary cache shared by two controllers
// through one storage.
#include "controller/byte_storage.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zstd.h>

#include "common/narinfo.h"
#include "common/testutil.h"
#include "controller/nar_cache.h"
#include "controller/pg_test_server.h"
#include "controller/store.h"

namespace muster {
namespace {

using ::testing::HasSubstr;
using testing::PgTestServer;

class ByteStorageTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "postgresql") {
      std::string why;
      pg_ = PgTestServer::Shared(&why);
      if (pg_ == nullptr && PgTestServer::FindBinDir().empty()) GTEST_SKIP() << why;
      ASSERT_NE(pg_, nullptr) << why;
      uri_ = pg_->Uri(pg_->NewDatabase());
      auto store = OpenPostgresStore(uri_);  // its migrations create the tables
      ASSERT_TRUE(store.ok()) << store.message();
    }
    storage_ = Open();
  }

  // A further storage on the same bytes (another controller's).
  std::unique_ptr<ByteStorage> Open() {
    auto s = GetParam() == "postgresql" ? OpenPostgresByteStorage(uri_, 2)
                                        : OpenFileByteStorage((dir_ / "b").string());
    EXPECT_TRUE(s.ok()) << s.message();
    return s.ok() ? std::move(*s) : nullptr;
  }

  testing::TempDir dir_;
  PgTestServer* pg_ = nullptr;
  std::string uri_;
  std::unique_ptr<ByteStorage> storage_;
};

INSTANTIATE_TEST_SUITE_P(Backends, ByteStorageTest, ::testing::Values("files", "postgresql"),
                         [](const auto& p) { return p.param; });

TEST_P(ByteStorageTest, AppendsOnlyAtTheCurrentEndAndPromotesWhole) {
  ByteStorage& b = *storage_;
  ASSERT_TRUE(b.Append("staging/x", 0, "hello ").ok());
  auto wrong = b.Append("staging/x", 2, "world");
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.message(), HasSubstr("resume from 6"));
  auto absent = b.Append("staging/y", 6, "world");
  ASSERT_FALSE(absent.ok());
  EXPECT_THAT(absent.message(), HasSubstr("resume from 0"));
  EXPECT_FALSE(b.Size("staging/y").has_value()) << "a later chunk creates nothing";
  auto end = b.Append("staging/x", 6, "world");
  ASSERT_TRUE(end.ok());
  EXPECT_EQ(*end, 11u);
  EXPECT_EQ(b.Size("staging/x"), 11u);
  EXPECT_FALSE(b.Size("nar/x").has_value());
  ASSERT_TRUE(b.Promote("staging/x", "nar/x").ok());
  EXPECT_EQ(*b.Read("nar/x", 6, 100), "world");
  EXPECT_EQ(*b.Read("nar/x", 0, 100), "hello world");
  EXPECT_FALSE(b.Size("staging/x").has_value());
  EXPECT_FALSE(b.Promote("staging/x", "nar/z").ok()) << "nothing left to promote";
  for (const char* bad : {"../x", "/abs", "a//b", ".hidden", "a/../b", "sp ace", ""}) {
    EXPECT_FALSE(ValidStorageKey(bad)) << bad;
    EXPECT_FALSE(b.Put(bad, "x").ok()) << bad;
  }
}

TEST_P(ByteStorageTest, RangedReadsOfALargeObjectReturnExactlyTheBytesAsked) {
  // Larger than one stored chunk (4 MiB), with bytes that tell their offset.
  std::string big(9 * 1024 * 1024 + 123, '\0');
  for (std::size_t i = 0; i < big.size(); ++i)
    big[i] = static_cast<char>((i * 7 + i / 4093) & 0xff);
  ASSERT_TRUE(storage_->Put("nar/big", big).ok());
  EXPECT_EQ(storage_->Size("nar/big"), big.size());
  const std::uint64_t mib = 1 << 20;
  for (auto [off, len] : std::vector<std::pair<std::uint64_t, std::size_t>>{{0, 10},
                                                                            {4 * mib - 5, 10},
                                                                            {4 * mib, 4 * mib},
                                                                            {3 * mib, 6 * mib + 7},
                                                                            {big.size() - 3, 100},
                                                                            {big.size(), 5},
                                                                            {0, big.size()}}) {
    auto r = storage_->Read("nar/big", off, len);
    ASSERT_TRUE(r.ok()) << r.message();
    std::size_t want = off >= big.size() ? 0 : std::min<std::size_t>(len, big.size() - off);
    ASSERT_EQ(r->size(), want) << off << "+" << len;
    EXPECT_TRUE(*r == big.substr(off, want)) << off << "+" << len;
  }
  // Appended in uneven pieces, then read across the pieces' edges.
  std::uint64_t at = 0;
  for (std::size_t piece : {1000u, 4u << 20, 3u, 2u << 20}) {
    auto r = storage_->Append("staging/big", at, std::string_view(big).substr(at, piece));
    ASSERT_TRUE(r.ok()) << r.message();
    at = *r;
  }
  auto across = storage_->Read("staging/big", 900, 5 << 20);
  ASSERT_TRUE(across.ok()) << across.message();
  EXPECT_TRUE(*across == big.substr(900, 5 << 20));
  EXPECT_FALSE(storage_->Read("nar/absent", 0, 10).ok());
}

TEST_P(ByteStorageTest, PutReplacesAndListAndRemoveSeeWhatAnotherInstanceWrote) {
  auto other = Open();
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(storage_->Put("a.narinfo", "one").ok());
  ASSERT_TRUE(other->Put("a.narinfo", "three").ok());
  EXPECT_EQ(*storage_->Read("a.narinfo", 0, 100), "three");
  ASSERT_TRUE(other->Put("nar/b", "bb").ok());
  ASSERT_TRUE(other->Append("staging/c", 0, "c").ok());
  std::vector<std::string> keys;
  for (const auto& e : storage_->List("")) keys.push_back(e.key);
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"a.narinfo", "nar/b", "staging/c"}));
  auto staged = storage_->List("staging/");
  ASSERT_EQ(staged.size(), 1u);
  EXPECT_EQ(staged[0].size, 1u);
  EXPECT_LE(std::abs(staged[0].mtime - static_cast<std::int64_t>(std::time(nullptr))), 5);
  ASSERT_TRUE(storage_->Remove("nar/b").ok());
  ASSERT_TRUE(storage_->Remove("nar/b").ok()) << "absent is fine";
  EXPECT_FALSE(other->Size("nar/b").has_value());
}

std::string Zstd(std::string_view data) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3));
  return out;
}

// Uploads a NAR of `size` bytes for /nix/store/<c×32>-p with refs through c.
nar::NarInfo UploadThrough(NarCache& cache, char c, std::vector<std::string> refs = {}) {
  std::string bytes(5000, c);
  nar::Sha256 h;
  h.Update(bytes);
  nar::NarInfo info;
  info.store_path = "/nix/store/" + std::string(32, c) + "-p";
  info.nar_hash = nar::FormatSha256(h.Final());
  info.nar_size = bytes.size();
  info.references = std::move(refs);
  info.sigs = {"k:c2ln"};
  info.compression = "zstd";
  EXPECT_TRUE(cache.Append(info.store_path, info.nar_hash, bytes.size(), 0, Zstd(bytes)).ok());
  auto done = cache.Commit(info);
  EXPECT_TRUE(done.ok()) << done.message();
  return done.ok() ? *done : info;
}

TEST_P(ByteStorageTest, TwoControllersOnOneStorageServeOneCache) {
  auto a_storage = Open(), b_storage = Open();
  ASSERT_TRUE(a_storage && b_storage);
  auto a = NarCache::Open(std::move(a_storage), 1 << 30);
  auto b = NarCache::Open(std::move(b_storage), 1 << 30);
  ASSERT_TRUE(a.ok() && b.ok());
  NarCache& ca = **a;
  NarCache& cb = **b;
  std::string leaf(32, 'l'), top(32, 'w');
  // Committed through a: b finds it when asked, by a read, by a closure walk.
  UploadThrough(ca, 'l');
  auto info = UploadThrough(ca, 'w', {leaf + "-p"});
  std::uint64_t rev = cb.Revision();
  std::uint64_t total = 0;
  auto nar = cb.Read(info.url, 0, 1 << 20, &total);
  ASSERT_TRUE(nar.ok()) << nar.message();
  EXPECT_EQ(total, info.file_size);
  EXPECT_GT(cb.Revision(), rev) << "what b learnt changes its revision";
  EXPECT_EQ(cb.Closure({info.store_path}), (std::set<std::string>{leaf, top}));
  EXPECT_TRUE(cb.Has(leaf));
  auto upload_again = cb.Append(info.store_path, info.nar_hash, info.nar_size, 0, "x");
  EXPECT_FALSE(upload_again.ok()) << "b knows the path is there";
  EXPECT_EQ(cb.Stats().paths, 2u);
  // Collected through a (nothing kept, no grace): b serves it no more, and
  // its status counts nothing.
  EXPECT_EQ(ca.CollectGarbage({}, 0, false).first, 2u);
  EXPECT_FALSE(cb.Read(info.url, 0, 10, &total).ok());
  EXPECT_FALSE(cb.Read(top + ".narinfo", 0, 10, &total).ok());
  EXPECT_EQ(cb.Stats().paths, 0u);
  EXPECT_FALSE(cb.Has(top));
}

}  // namespace
}  // namespace muster
