#include "controller/nar_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zstd.h>

#include <filesystem>

#include "common/testutil.h"
#include "controller/cache_service.h"

namespace muster {
namespace {

using ::testing::HasSubstr;

std::string Zstd(std::string_view data) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3));
  return out;
}

// A path named by its hash character, e.g. P('a') = /nix/store/aaaa…-p.
std::string P(char c, const std::string& name = "p") {
  return "/nix/store/" + std::string(32, c) + "-" + name;
}

struct Nar {
  std::string path, bytes, zst, hash;
  std::vector<std::string> refs;
};

Nar MakeNar(char c, std::vector<std::string> refs = {}, std::size_t size = 3000) {
  Nar n;
  n.path = P(c);
  for (std::size_t i = 0; i < size; ++i) n.bytes.push_back(static_cast<char>((i * 31 + c) % 251));
  n.zst = Zstd(n.bytes);
  nar::Sha256 h;
  h.Update(n.bytes);
  n.hash = nar::FormatSha256(h.Final());
  n.refs = std::move(refs);
  return n;
}

nar::NarInfo Info(const Nar& n) {
  nar::NarInfo i;
  i.store_path = n.path;
  i.nar_hash = n.hash;
  i.nar_size = n.bytes.size();
  for (const auto& r : n.refs) i.references.push_back(r.substr(11));
  i.sigs = {"k:c2ln"};
  return i;
}

class NarCacheTest : public ::testing::Test {
 protected:
  void SetUp() override { Reopen(1 << 30); }
  void Reopen(std::uint64_t max) {
    cache_.reset();
    auto s = OpenFileByteStorage((dir_ / "cache").string());
    ASSERT_TRUE(s.ok()) << s.message();
    auto c = NarCache::Open(std::move(*s), max);
    ASSERT_TRUE(c.ok()) << c.message();
    cache_ = std::move(*c);
  }
  // The narinfo the cache serves for the path named by c.
  Result<nar::NarInfo> StoredInfo(char c) {
    std::uint64_t total = 0;
    auto text = cache_->Read(std::string(32, c) + ".narinfo", 0, 1 << 20, &total);
    if (!text) return text.error();
    return nar::ParseNarInfo(*text);
  }
  Status Upload(const Nar& n) {
    auto off = cache_->Append(n.path, n.hash, n.bytes.size(), 0, n.zst);
    if (!off) return off.error();
    auto done = cache_->Commit(Info(n));
    if (!done) return done.error();
    return Status::Ok();
  }
  std::vector<std::string> Files(const std::string& sub) {
    std::vector<std::string> out;
    std::error_code ec;
    for (auto& e : std::filesystem::directory_iterator(dir_ / "cache" / sub, ec)) {
      out.push_back(e.path().filename().string());
    }
    return out;
  }
  testing::TempDir dir_;
  std::unique_ptr<NarCache> cache_;
};

TEST_F(NarCacheTest, CommittedPathIsServedInNixLayout) {
  Nar n = MakeNar('a');
  ASSERT_TRUE(Upload(n).ok());
  EXPECT_TRUE(cache_->Has(n.path));
  std::uint64_t total = 0;
  auto info = StoredInfo('a');
  ASSERT_TRUE(info.ok()) << info.message();
  EXPECT_EQ(info->compression, "zstd");
  EXPECT_EQ(info->nar_hash, n.hash);
  EXPECT_EQ(info->file_size, n.zst.size());
  auto nar = cache_->Read(info->url, 0, 1 << 20, &total);
  ASSERT_TRUE(nar.ok());
  EXPECT_EQ(*nar, n.zst);
  EXPECT_EQ(NarCache::HashOfObject(info->url), std::string(32, 'a'));
  auto info_file = cache_->Read("nix-cache-info", 0, 100, &total);
  ASSERT_TRUE(info_file.ok());
  EXPECT_THAT(*info_file, HasSubstr("StoreDir: /nix/store"));
  EXPECT_TRUE(Files("staging").empty());
  // The index survives a restart.
  Reopen(1 << 30);
  EXPECT_TRUE(cache_->Has(n.path));
  EXPECT_EQ(cache_->Stats().paths, 1u);
}

TEST_F(NarCacheTest, ResumedUploadContinuesAtTheStagedOffset) {
  Nar n = MakeNar('b', {}, 200000);
  std::size_t half = n.zst.size() / 2;
  ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), 0, n.zst.substr(0, half)).ok());
  Reopen(1 << 30);  // a controller restart in between
  EXPECT_EQ(cache_->StagedOffset(n.path, n.hash), half);
  EXPECT_FALSE(cache_->Has(n.path));
  ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), half, n.zst.substr(half)).ok());
  auto done = cache_->Commit(Info(n));
  ASSERT_TRUE(done.ok()) << done.message();
  EXPECT_TRUE(cache_->Has(n.path));
}

TEST_F(NarCacheTest, BadUploadsAreRefusedAndLeaveNothing) {
  Nar n = MakeNar('c');
  std::string flipped = n.bytes;
  flipped[100] ^= 1;
  constexpr auto kNone = NarCompression::kNone;
  constexpr auto kZstd = NarCompression::kZstd;
  struct Case {
    std::string name, bytes;
    std::uint64_t nar_size;
    std::string hash, why;
    NarCompression compression;
  } cases[] = {
      {"truncated", n.zst.substr(0, n.zst.size() - 5), n.bytes.size(), n.hash, "truncated", kZstd},
      {"hash differs", n.zst, n.bytes.size(), MakeNar('z').hash, "NAR hash", kZstd},
      {"larger than narSize", n.zst, n.bytes.size() - 1, n.hash, "larger than its narSize", kZstd},
      {"smaller than narSize", n.zst, n.bytes.size() + 1, n.hash, "narSize says", kZstd},
      {"not zstd", std::string(100, 'x'), n.bytes.size(), n.hash, "not valid zstd", kZstd},
      {"uncompressed, a bit flipped", flipped, n.bytes.size(), n.hash, "NAR hash", kNone},
      {"uncompressed, short", n.bytes.substr(0, 2000), n.bytes.size(), n.hash, "narSize says",
       kNone},
  };
  for (const auto& c : cases) {
    ASSERT_TRUE(cache_->Append(n.path, c.hash, c.nar_size, 0, c.bytes, c.compression).ok())
        << c.name;
    auto info = Info(n);
    info.nar_hash = c.hash;
    info.nar_size = c.nar_size;
    info.compression = NarCompressionName(c.compression);
    auto r = cache_->Commit(info);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(r.message(), HasSubstr(c.why)) << c.name;
    EXPECT_THAT(r.message(), HasSubstr("nothing was added")) << c.name;
    EXPECT_FALSE(cache_->Has(n.path)) << c.name;
    EXPECT_TRUE(Files("staging").empty()) << c.name;
    EXPECT_TRUE(Files("nar").empty()) << c.name;
  }
  // More bytes than a compressed NAR of that size can be: refused at once.
  auto big = cache_->Append(n.path, n.hash, 10, 0, std::string(9000, 'x'));
  ASSERT_FALSE(big.ok());
  EXPECT_THAT(big.message(), HasSubstr("larger than a compressed NAR"));
  EXPECT_TRUE(Files("staging").empty());
}

TEST_F(NarCacheTest, UncompressedUploadIsServedAsCompressionNone) {
  Nar n = MakeNar('w', {}, 200000);
  // Two chunks: verified as they arrive, with no decompression.
  std::size_t half = n.bytes.size() / 2;
  ASSERT_TRUE(cache_
                  ->Append(n.path, n.hash, n.bytes.size(), 0, n.bytes.substr(0, half),
                           NarCompression::kNone)
                  .ok());
  EXPECT_EQ(cache_->StagedOffset(n.path, n.hash, NarCompression::kNone), half);
  EXPECT_EQ(cache_->StagedOffset(n.path, n.hash, NarCompression::kZstd), 0u);
  ASSERT_TRUE(cache_
                  ->Append(n.path, n.hash, n.bytes.size(), half, n.bytes.substr(half),
                           NarCompression::kNone)
                  .ok());
  auto info = Info(n);
  info.compression = "none";
  auto done = cache_->Commit(info);
  ASSERT_TRUE(done.ok()) << done.message();
  auto stored = StoredInfo('w');
  ASSERT_TRUE(stored.ok()) << stored.message();
  EXPECT_EQ(stored->compression, "none");
  EXPECT_EQ(stored->file_hash, n.hash);  // the file is the NAR
  EXPECT_EQ(stored->file_size, n.bytes.size());
  EXPECT_THAT(stored->url, ::testing::EndsWith(".nar"));
  std::uint64_t total = 0;
  auto nar = cache_->Read(stored->url, 0, 1 << 20, &total);
  ASSERT_TRUE(nar.ok()) << nar.message();
  EXPECT_EQ(*nar, n.bytes);
  EXPECT_EQ(total, n.bytes.size());
  EXPECT_TRUE(Files("staging").empty());
}

TEST_F(NarCacheTest, UncompressedUploadsAreBoundedByNarSizeAndKeyedByEncoding) {
  Nar n = MakeNar('v');
  // One byte more than narSize: refused at once, nothing staged.
  auto big =
      cache_->Append(n.path, n.hash, n.bytes.size(), 0, n.bytes + "x", NarCompression::kNone);
  ASSERT_FALSE(big.ok());
  EXPECT_THAT(big.message(), HasSubstr("larger than an uncompressed NAR"));
  EXPECT_TRUE(Files("staging").empty());
  // A zstd upload is not committed as an uncompressed one (nor the reverse).
  ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), 0, n.zst).ok());
  auto info = Info(n);
  info.compression = "none";
  auto wrong = cache_->Commit(info);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.message(), HasSubstr("nothing was uploaded"));
  info.compression = "xz";
  EXPECT_THAT(cache_->Commit(info).message(), HasSubstr("use zstd or none"));
  info.compression = "zstd";
  EXPECT_TRUE(cache_->Commit(info).ok());
}

TEST_F(NarCacheTest, FullCacheRefusesUploads) {
  Reopen(4096);
  Nar n = MakeNar('d', {}, 100000);
  auto r = cache_->Append(n.path, n.hash, n.bytes.size(), 0, std::string(5000, 'x'));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("cache is full"));
  EXPECT_THAT(r.message(), HasSubstr("--cache-max-bytes"));
}

TEST_F(NarCacheTest, StagedBytesCountTowardsTheBoundAndAreGivenBack) {
  Nar a = MakeNar('p', {}, 4000), b = MakeNar('q', {}, 4000);
  Reopen(a.zst.size() + b.zst.size() / 2);
  ASSERT_TRUE(cache_->Append(a.path, a.hash, a.bytes.size(), 0, a.zst).ok());
  EXPECT_EQ(cache_->Stats().staged_bytes, a.zst.size());
  auto full = cache_->Append(b.path, b.hash, b.bytes.size(), 0, b.zst);
  ASSERT_FALSE(full.ok()) << "staged bytes count";
  EXPECT_THAT(full.message(), HasSubstr("cache is full"));
  // A refused commit discards a's bytes and gives their room back.
  auto info = Info(a);
  info.nar_hash = b.hash;  // wrong: nothing staged under that hash
  EXPECT_FALSE(cache_->Commit(info).ok());
  info.nar_size = a.bytes.size() + 1;
  info.nar_hash = a.hash;
  ASSERT_FALSE(cache_->Commit(info).ok());
  EXPECT_EQ(cache_->Stats().staged_bytes, 0u);
  ASSERT_TRUE(Upload(b).ok()) << "room given back";
  EXPECT_EQ(cache_->Stats().staged_bytes, 0u) << "promoted bytes are committed, not staged";
  // A restart counts what is staged again.
  Reopen(1 << 30);
  ASSERT_TRUE(cache_->Append(a.path, a.hash, a.bytes.size(), 0, a.zst.substr(0, 100)).ok());
  std::uint64_t committed = cache_->Stats().bytes;
  Reopen(committed + a.zst.size() - 1);
  EXPECT_EQ(cache_->Stats().staged_bytes, 100u);
  auto again = cache_->Append(a.path, a.hash, a.bytes.size(), 100, a.zst.substr(100));
  ASSERT_FALSE(again.ok()) << "committed b plus staged a exceed the bound by one byte";
  EXPECT_THAT(again.message(), HasSubstr("cache is full"));
}

TEST_F(NarCacheTest, VerifiedWhileArrivingEqualsVerifiedAtCommit) {
  // The same NAR uploaded in chunks (verified as it arrives) and resumed
  // across a restart (read back at commit) gives the same narinfo.
  Nar n = MakeNar('k', {}, 300000);
  std::size_t step = n.zst.size() / 3 + 1;
  for (std::size_t off = 0; off < n.zst.size(); off += step) {
    ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), off, n.zst.substr(off, step)).ok());
  }
  auto live = cache_->Commit(Info(n));
  ASSERT_TRUE(live.ok()) << live.message();
  ASSERT_EQ(cache_->CollectGarbage({}, 0, false).first, 1u);
  ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), 0, n.zst.substr(0, step)).ok());
  Reopen(1 << 30);
  ASSERT_TRUE(cache_->Append(n.path, n.hash, n.bytes.size(), step, n.zst.substr(step)).ok());
  auto read_back = cache_->Commit(Info(n));
  ASSERT_TRUE(read_back.ok()) << read_back.message();
  EXPECT_EQ(nar::FormatNarInfo(*live), nar::FormatNarInfo(*read_back));
  // A bad chunk in the middle is found either way.
  Nar m = MakeNar('m', {}, 300000);
  std::string bad = m.zst;
  bad[bad.size() / 2] = static_cast<char>(bad[bad.size() / 2] ^ 0x55);
  ASSERT_TRUE(cache_->Append(m.path, m.hash, m.bytes.size(), 0, bad).ok());
  auto r = cache_->Commit(Info(m));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.message(), HasSubstr("nothing was added"));
}

TEST_F(NarCacheTest, ClosureFollowsReferencesAndGcKeepsIt) {
  Nar leaf = MakeNar('d'), mid = MakeNar('f', {P('d')}), top = MakeNar('g', {P('f'), P('d')});
  Nar other = MakeNar('h');
  for (auto* n : {&leaf, &mid, &top, &other}) ASSERT_TRUE(Upload(*n).ok());
  auto c = cache_->Closure({top.path});
  EXPECT_EQ(
      c, (std::set<std::string>{std::string(32, 'd'), std::string(32, 'f'), std::string(32, 'g')}));
  auto [dry_paths, dry_bytes] = cache_->CollectGarbage(c, 0, true);
  EXPECT_EQ(dry_paths, 1u);
  EXPECT_GT(dry_bytes, 0u);
  EXPECT_TRUE(cache_->Has(other.path));  // a dry run removes nothing
  // Within the grace period nothing goes.
  EXPECT_EQ(cache_->CollectGarbage(c, 3600, false).first, 0u);
  EXPECT_EQ(cache_->CollectGarbage(c, 0, false).first, 1u);
  EXPECT_FALSE(cache_->Has(other.path));
  for (auto* n : {&leaf, &mid, &top}) EXPECT_TRUE(cache_->Has(n->path));
  std::uint64_t total = 0;
  EXPECT_FALSE(cache_->Read(std::string(32, 'h') + ".narinfo", 0, 10, &total).ok());
}

class CacheServiceTest : public NarCacheTest {
 protected:
  void SetUp() override {
    NarCacheTest::SetUp();
    auto s = OpenSqliteStore((dir_ / "muster.db").string());
    ASSERT_TRUE(s.ok());
    store_ = std::move(*s);
    for (const char* m : {"web1", "db1"}) {
      MachineRecord r;
      r.name = m;
      r.key = std::string("ed25519:") + m;
      ASSERT_TRUE(store_->AddMachine(r).ok());
    }
  }
  void Publish(const std::string& machine, std::int64_t gen, const std::string& toplevel) {
    GenerationRecord g;
    g.machine = machine;
    g.generation = gen;
    g.manifest = {"{}", "ed25519:op", "sig"};
    g.toplevel = toplevel;
    g.action = "switch";
    g.published_by = "alice";
    ASSERT_TRUE(store_->AddGeneration(g).ok());
  }
  int Status(CacheService& svc, const std::string& machine, const std::string& name) {
    return svc.Fetch(machine, proto::Fetch{1, name, 0, 1 << 20}).status;
  }
  std::unique_ptr<Store> store_;
};

TEST_F(CacheServiceTest, MachineFetchesOnlyClosuresPublishedForIt) {
  Nar lib = MakeNar('i'), web = MakeNar('j', {P('i')}), db = MakeNar('k');
  Nar web2 = MakeNar('l'), web3 = MakeNar('m');
  for (auto* n : {&lib, &web, &db, &web2, &web3}) ASSERT_TRUE(Upload(*n).ok());
  Publish("web1", 1, web.path);
  Publish("db1", 1, db.path);
  auto storage = OpenFileByteStorage((dir_ / "cache").string());
  auto nc = NarCache::Open(std::move(*storage), 1 << 30);
  ASSERT_TRUE(nc.ok());
  CacheService svc(*store_, std::move(*nc), 0);
  const std::string lib_info = std::string(32, 'i') + ".narinfo";
  const std::string db_info = std::string(32, 'k') + ".narinfo";
  EXPECT_EQ(Status(svc, "web1", "nix-cache-info"), 200);
  EXPECT_EQ(Status(svc, "web1", lib_info), 200);  // a dependency of its target
  EXPECT_EQ(Status(svc, "web1", db_info), 404);   // another machine's path
  EXPECT_EQ(Status(svc, "db1", db_info), 200);
  EXPECT_EQ(Status(svc, "db1", lib_info), 404);
  EXPECT_EQ(Status(svc, "web1", "../" + db_info), 404);
  // The NAR of a path it may fetch, but not one of another path under a borrowed name.
  std::uint64_t total = 0;
  auto text = svc.cache().Read(lib_info, 0, 1 << 20, &total);
  auto url = nar::ParseNarInfo(*text)->url;
  EXPECT_EQ(Status(svc, "web1", url), 200);
  EXPECT_EQ(Status(svc, "db1", url), 404);
  EXPECT_EQ(Status(svc, "web1", "nar/" + std::string(32, 'i') + "-forged.nar.zst"), 404);
  // Target and previous stay fetchable; what came before them does not.
  Publish("web1", 2, web2.path);
  EXPECT_EQ(Status(svc, "web1", lib_info), 200);
  Publish("web1", 3, web3.path);
  EXPECT_EQ(Status(svc, "web1", lib_info), 404);
  EXPECT_EQ(Status(svc, "web1", std::string(32, 'l') + ".narinfo"), 200);
  // ...unless the machine still runs it.
  EventRecord ev;
  ev.generation = 1;
  ev.phase = "succeeded";
  ev.at = 1;
  ASSERT_TRUE(store_->RecordStatus("web1", ev, web.path, false).ok());
  EXPECT_EQ(Status(svc, "web1", lib_info), 200);
  // A machine that names another's toplevel as its own learns nothing: the
  // current generation's toplevel is the one the operator published.
  ASSERT_TRUE(store_->RecordStatus("db1", ev, web.path, false).ok());
  EXPECT_EQ(Status(svc, "db1", lib_info), 404);
  EXPECT_EQ(Status(svc, "db1", db_info), 200);
  ev.generation = 99;  // a generation never published for it
  ASSERT_TRUE(store_->RecordStatus("db1", ev, web.path, false).ok());
  EXPECT_EQ(Status(svc, "db1", lib_info), 404);
  // GC keeps every path some machine may fetch and removes the rest.
  Nar stray = MakeNar('n');
  ASSERT_TRUE(svc.cache().Append(stray.path, stray.hash, stray.bytes.size(), 0, stray.zst).ok());
  ASSERT_TRUE(svc.cache().Commit(Info(stray)).ok());
  auto [paths, bytes] = svc.CollectGarbage(false);
  EXPECT_EQ(paths, 1u);
  EXPECT_FALSE(svc.cache().Has(stray.path));
  for (auto* n : {&lib, &web, &db, &web2, &web3}) EXPECT_TRUE(svc.cache().Has(n->path)) << n->path;
}

}  // namespace
}  // namespace muster
