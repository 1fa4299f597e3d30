#include "agent/preview.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

namespace muster {

namespace {
constexpr std::string_view kStore = "/nix/store/";

std::vector<std::string> SplitUnits(std::string_view list) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < list.size()) {
    std::size_t j = list.find(',', i);
    if (j == std::string_view::npos) j = list.size();
    std::string_view u = list.substr(i, j - i);
    while (!u.empty() && std::isspace(static_cast<unsigned char>(u.front()))) u.remove_prefix(1);
    while (!u.empty() && std::isspace(static_cast<unsigned char>(u.back()))) u.remove_suffix(1);
    if (!u.empty()) out.emplace_back(u);
    i = j + 1;
  }
  return out;
}

void AddUnique(std::vector<std::string>& v, std::vector<std::string> more) {
  for (auto& u : more) {
    if (v.size() >= proto::kMaxPreviewItems) return;
    if (std::find(v.begin(), v.end(), u) == v.end()) v.push_back(std::move(u));
  }
}

std::string JoinSet(const std::set<std::string>& s) {
  std::string out;
  for (const auto& x : s) out += (out.empty() ? "" : ", ") + x;
  return out;
}
}  // namespace

std::string StorePathName(std::string_view path) {
  if (path.substr(0, kStore.size()) == kStore) path.remove_prefix(kStore.size());
  auto dash = path.find('-');
  if (dash == std::string_view::npos) return std::string(path);
  return std::string(path.substr(dash + 1));
}

StoreName ParseStoreName(std::string_view path) {
  std::string full = StorePathName(path);
  for (std::size_t i = 0; i + 1 < full.size(); ++i) {
    if (full[i] == '-' && std::isdigit(static_cast<unsigned char>(full[i + 1]))) {
      return {full.substr(0, i), full.substr(i + 1)};
    }
  }
  return {full, ""};
}

std::vector<proto::VersionChange> DiffVersions(const std::vector<std::string>& before,
                                               const std::vector<std::string>& after) {
  auto index = [](const std::vector<std::string>& paths) {
    std::map<std::string, std::set<std::string>> out;
    for (const auto& p : paths) {
      StoreName n = ParseStoreName(p);
      if (n.version.empty() || n.name.empty()) continue;
      out[n.name].insert(n.version);
    }
    return out;
  };
  auto b = index(before), a = index(after);
  std::vector<proto::VersionChange> out;
  for (const auto& [name, versions] : a) {
    auto it = b.find(name);
    if (it == b.end()) {
      out.push_back({name, "", JoinSet(versions)});
    } else if (it->second != versions) {
      out.push_back({name, JoinSet(it->second), JoinSet(versions)});
    }
  }
  for (const auto& [name, versions] : b) {
    if (!a.count(name)) out.push_back({name, JoinSet(versions), ""});
  }
  std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.name < y.name; });
  return out;
}

void ParseDryActivate(std::string_view output, proto::PreviewReport* r) {
  struct Verb {
    std::string_view prefix;
    std::vector<std::string>* list;
  } verbs[] = {
      {"would stop the following units: ", &r->units_stop},
      {"would reload the following units: ", &r->units_reload},
      {"would restart the following units: ", &r->units_restart},
      {"would start the following units: ", &r->units_start},
  };
  std::size_t i = 0;
  while (i < output.size()) {
    std::size_t j = output.find('\n', i);
    if (j == std::string_view::npos) j = output.size();
    std::string_view line = output.substr(i, j - i);
    i = j + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == "would restart systemd") {
      AddUnique(r->units_restart, {"systemd"});
      continue;
    }
    for (const auto& v : verbs) {
      if (line.substr(0, v.prefix.size()) == v.prefix) {
        AddUnique(*v.list, SplitUnits(line.substr(v.prefix.size())));
      }
    }
  }
}

proto::PreviewReport RunPreview(const Manifest& m, SystemOps& ops, const LineSink& sink) {
  proto::PreviewReport r;
  r.toplevel = m.toplevel;
  r.current = ops.ActiveToplevel();
  if (auto est = ops.EstimateFetch(m); est && est->known) {
    r.fetch_paths = est->paths;
    r.download_bytes = est->download_bytes;
    r.unpacked_bytes = est->unpacked_bytes;
  }
  if (auto real = ops.Realise(m, sink); !real) {
    r.error = "realise: " + real.message();
    return r;
  }
  auto after = ops.Closure(m.toplevel);
  if (!after) {
    r.error = after.message();
    return r;
  }
  std::vector<std::string> before;
  if (!r.current.empty()) {
    auto b = ops.Closure(r.current);
    if (!b) {
      r.error = b.message();
      return r;
    }
    before = *b;
  }
  std::set<std::string> bs(before.begin(), before.end()), as(after->begin(), after->end());
  for (const auto& p : as) {
    if (bs.count(p)) continue;
    ++r.added_count;
    if (r.added.size() < proto::kMaxPreviewItems) r.added.push_back(StorePathName(p));
  }
  for (const auto& p : bs) {
    if (as.count(p)) continue;
    ++r.removed_count;
    if (r.removed.size() < proto::kMaxPreviewItems) r.removed.push_back(StorePathName(p));
  }
  std::vector<std::string> before_pkgs, after_pkgs;
  for (const auto& p : before) {
    if (p != r.current) before_pkgs.push_back(p);
  }
  for (const auto& p : *after) {
    if (p != m.toplevel) after_pkgs.push_back(p);
  }
  r.versions = DiffVersions(before_pkgs, after_pkgs);
  if (r.versions.size() > proto::kMaxPreviewItems) r.versions.resize(proto::kMaxPreviewItems);
  Kind kind = m.kind == Kind::kAuto ? ops.DetectKind(m.toplevel) : m.kind;
  if (kind == Kind::kNixos) {
    auto out = ops.DryActivate(m.toplevel, sink);
    if (!out) {
      r.error = "dry-activate: " + out.message();
      return r;
    }
    ParseDryActivate(*out, &r);
  }
  r.reboot_required = ops.RebootRequired(m.toplevel);
  return r;
}

}  // namespace muster
