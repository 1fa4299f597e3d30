// muster machine … / muster operator …: changes to the signed roster.
#include <iostream>

#include "common/roster.h"
#include "controller/cli/commands.h"
#include "controller/cli/trust.h"

using nlohmann::json;

namespace muster::cli {

namespace {

// Everything a roster command needs: key, connection, trusted keys, memory.
struct Session {
  SecretKey key = SecretKey::Generate();  // replaced by the operator key
  std::unique_ptr<Connection> conn;
  std::vector<PublicKey> trusted;
  SeenEntries seen{StateHome() + "/roster-seen.json"};
};

int Open(const Globals& g, Session& s) {
  if (int rc = OpenConnection(g, &s.conn, &s.key)) return rc;
  s.trusted = TrustedOperatorKeys(g, s.key);
  if (auto st = s.seen.Load(); !st) return Die(st.message(), kExitUsage);
  return 0;
}

Result<RosterView> Fetch(Session& s, const std::vector<std::string>& names) {
  json params = json::object();
  if (!names.empty()) params["names"] = names;
  auto res = s.conn->Call("roster", params);
  if (!res) return res.error();
  RosterView view((*res)["machines"], (*res)["removed"], s.trusted, s.seen);
  if (auto st = s.seen.Save(); !st) return st.error();
  return view;
}

// A signedAt after everything this CLI has seen for the machine, so that an
// operator clock a little behind still produces a newer entry.
std::int64_t NextSignedAt(const Session& s, const std::string& name, std::int64_t held = 0) {
  return std::max({NowMs(), s.seen.Get(name) + 1, held + 1});
}

// The controller's row for a machine in a "roster" answer, or null.
const json* FindRow(const json& roster, const std::string& name) {
  for (const auto& m : roster["machines"]) {
    if (m.value("name", "") == name) return &m;
  }
  return nullptr;
}

int Done(const Globals& g, const json& res, const std::string& text) {
  if (g.json_out) {
    std::cout << res.dump() << "\n";
  } else {
    std::cout << text << "\n";
  }
  return 0;
}

}  // namespace

int MachineAdd(const Globals& g, const std::string& name, const std::string& key,
               const std::vector<std::string>& tags) {
  if (auto st = ValidateMachineName(name); !st) return Die(st.message(), kExitUsage);
  if (auto st = ValidateTags(tags); !st) return Die(st.message(), kExitUsage);
  auto pk = ParsePublicKey(key);
  if (!pk) return Die(pk.message(), kExitUsage);
  Session s;
  if (int rc = Open(g, s)) return rc;
  RosterEntry e;
  e.machine = name;
  e.key = pk->ToText();
  e.tags = tags;
  e.signed_at = NextSignedAt(s, name);
  auto res = SendEntry(*s.conn, "machine.add", e, s.key, s.seen);
  if (!res) return Die(res.message(), kExitFailed);
  return Done(g, *res, "machine " + name + " added (key " + pk->Fingerprint() + ")");
}

int MachineTag(const Globals& g, const std::string& name, const std::vector<std::string>& tags) {
  if (auto st = ValidateTags(tags); !st) return Die(st.message(), kExitUsage);
  Session s;
  if (int rc = Open(g, s)) return rc;
  auto view = Fetch(s, {name});
  if (!view) return Die(view.message(), kExitFailed);
  auto m = view->Get(name);
  if (!m) return Die(m.message(), kExitFailed);
  RosterEntry e;
  e.machine = name;
  e.key = m->key.ToText();
  e.tags = tags;
  e.signed_at = NextSignedAt(s, name, m->signed_at);
  auto res = SendEntry(*s.conn, "machine.tag", e, s.key, s.seen);
  if (!res) return Die(res.message(), kExitFailed);
  return Done(g, *res, "machine " + name + " tagged");
}

int MachineSign(const Globals& g, const std::string& name, const std::string& expect_fingerprint,
                const std::vector<std::string>& tags, bool set_tags) {
  Session s;
  if (int rc = Open(g, s)) return rc;
  auto res = s.conn->Call("roster", {{"names", {name}}});
  if (!res) return Die(res.message(), kExitFailed);
  const json* row = FindRow(*res, name);
  if (!row) return Die("no machine named '" + name + "'", kExitFailed);
  // The key below comes from the controller and is exactly what is not yet
  // trusted: the operator compares its fingerprint with the machine's own
  // ('muster-agent --print-key' prints the key on the machine).
  json binding = row->value("binding", json(nullptr));
  std::string key_text = binding.is_object() ? binding.value("key", "") : row->value("key", "");
  auto pk = ParsePublicKey(key_text);
  if (!pk) return Die("the controller holds no valid key for '" + name + "'", kExitFailed);
  std::vector<std::string> new_tags = tags;
  std::int64_t held = 0;
  if (!set_tags) {
    // Keep the tags of a verified entry; an unsigned machine's tags are the
    // controller's word and need the operator's eye like the key.
    RosterView view((*res)["machines"], (*res)["removed"], s.trusted, s.seen);
    if (auto m = view.Get(name)) {
      new_tags = m->tags;
      held = m->signed_at;
    } else if (auto s2 = EntryFromJson(row->value("roster", json(nullptr))); s2) {
      if (auto e = ParseRosterEntry(s2->entry)) new_tags = e->tags, held = e->signed_at;
    } else {
      for (const auto& t : row->value("tags", json::array())) {
        if (t.is_string()) new_tags.push_back(t.get<std::string>());
      }
    }
    if (auto st = ValidateTags(new_tags); !st) return Die(st.message(), kExitFailed);
  }
  std::cerr << "machine " << Printable(name) << "\n  key          " << pk->ToText()
            << "\n  fingerprint  " << pk->Fingerprint() << "\n  tags         "
            << JoinTags(json(new_tags)) << "\n";
  if (!expect_fingerprint.empty()) {
    auto want = ParseFingerprint(expect_fingerprint);
    if (!want) return Die(want.message(), kExitUsage);
    if (*want != pk->Fingerprint()) {
      return Die("the controller holds key " + pk->Fingerprint() + " for '" + name +
                     "', not the expected " + *want +
                     "; not signing (the controller may have "
                     "swapped the key)",
                 kExitFailed);
    }
  } else if (!g.yes) {
    if (!Interactive()) {
      return Die("refusing to sign '" + name +
                     "' without checking its key: pass --fingerprint sha256:… (as 'muster-agent "
                     "--print-key' prints it on the machine), or run on a "
                     "terminal to confirm, or --yes",
                 kExitUsage);
    }
    if (!Confirm("Is this the key printed on the machine itself? Sign it")) {
      return Die("not signed", kExitFailed);
    }
  }
  RosterEntry e;
  e.machine = name;
  e.key = pk->ToText();
  e.tags = new_tags;
  e.signed_at = NextSignedAt(s, name, held);
  auto sent = SendEntry(*s.conn, "machine.sign", e, s.key, s.seen);
  if (!sent) return Die(sent.message(), kExitFailed);
  return Done(g, *sent, "machine " + name + " signed (key " + pk->Fingerprint() + ")");
}

int MachineRemove(const Globals& g, const std::string& name) {
  Session s;
  if (int rc = Open(g, s)) return rc;
  RosterEntry e;
  e.machine = name;
  e.removed = true;
  e.signed_at = NextSignedAt(s, name);
  auto res = SendEntry(*s.conn, "machine.remove", e, s.key, s.seen);
  if (!res) return Die(res.message(), kExitFailed);
  return Done(g, *res, "machine " + name + " removed");
}

int MachineRevoke(const Globals& g, const std::string& name) {
  Session s;
  if (int rc = Open(g, s)) return rc;
  auto res = s.conn->Call("roster", {{"names", {name}}});
  if (!res) return Die(res.message(), kExitFailed);
  const json* row = FindRow(*res, name);
  if (!row) return Die("no machine named '" + name + "'", kExitFailed);
  // Revoking the key the controller reports can only take trust away, so
  // it needs no verification; a verified entry's tags are kept.
  RosterView view((*res)["machines"], (*res)["removed"], s.trusted, s.seen);
  RosterEntry e;
  e.machine = name;
  e.key = row->value("key", "");
  e.revoked = true;
  std::int64_t held = 0;
  if (auto m = view.Get(name)) {
    e.tags = m->tags;
    held = m->signed_at;
  }
  e.signed_at = NextSignedAt(s, name, held);
  auto sent = SendEntry(*s.conn, "machine.revoke", e, s.key, s.seen);
  if (!sent) return Die(sent.message(), kExitFailed);
  return Done(g, *sent,
              "machine " + name + " revoked: its key is refused and no vars are sealed to it");
}

int MachineList(const Globals& g) {
  Session s;
  if (int rc = Open(g, s)) return rc;
  auto res = s.conn->Call("machine.list", json::object());
  if (!res) return Die(res.message(), kExitFailed);
  RosterView view((*res)["machines"], json::array(), s.trusted, s.seen);
  (void)s.seen.Save();
  json out = json::array();
  std::vector<std::vector<std::string>> rows = {
      {"MACHINE", "TAGS", "ONLINE", "FINGERPRINT", "ROSTER"}};
  for (const auto& m : (*res)["machines"]) {
    std::string name = m.value("name", "");
    auto t = view.Get(name);
    std::string trust, fp, tags;
    if (t) {
      trust = std::string(t->enrolled ? "enrolled, grant " : "") + "signed by " + t->signer;
      fp = t->key.Fingerprint();
      tags = JoinTags(json(t->tags));
    } else {
      const std::string& why = view.untrusted().at(name);
      trust = why.rfind("unsigned", 0) == 0                   ? "UNSIGNED"
              : why.rfind("revoked", 0) == 0                  ? "revoked"
              : why.find("not enrolled") != std::string::npos ? "awaiting enrolment"
                                                              : "UNTRUSTED";
      if (auto pk = ParsePublicKey(m.value("key", ""))) fp = pk->Fingerprint();
      tags = "(" + JoinTags(m.value("tags", json::array())) + ")";
    }
    json row = m;
    row["trusted"] = t.ok();
    row["trust"] = t ? trust : view.untrusted().at(name);
    out.push_back(row);
    rows.push_back(
        {Printable(name), tags, m.value("online", false) ? "yes" : "no", fp.substr(0, 19), trust});
  }
  if (g.json_out) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  PrintTable(rows);
  for (const auto& [name, why] : view.untrusted()) {
    if (why != "revoked") std::cerr << "muster: " << Printable(name) << ": " << why << "\n";
  }
  return 0;
}

int MachineEnroll(const Globals& g, const std::string& name, const std::vector<std::string>& tags,
                  std::int64_t ttl_s) {
  if (auto st = ValidateMachineName(name); !st) return Die(st.message(), kExitUsage);
  if (auto st = ValidateTags(tags); !st) return Die(st.message(), kExitUsage);
  if (ttl_s < 1 || ttl_s > 30LL * 24 * 3600) {
    return Die("--ttl must be between 1 second and 30 days (2592000)", kExitUsage);
  }
  Session s;
  if (int rc = Open(g, s)) return rc;
  // The token is made here and never sent: the controller gets the grant,
  // which names only the public half of the key derived from it.
  std::string token = NewEnrollToken();
  auto ek = EnrollKeyFromToken(token);
  if (!ek) return Die(ek.message(), kExitFailed);
  RosterEntry e;
  e.machine = name;
  e.enroll_key = ek->public_key().ToText();
  e.tags = tags;
  e.signed_at = NextSignedAt(s, name);
  e.expires_at = e.signed_at + ttl_s * 1000;
  SignedRosterEntry grant = SignRosterEntry(e, s.key);
  auto res = s.conn->Call("machine.enroll", {{"grant", EntryToJson(grant)}});
  if (!res) return Die(res.message(), kExitFailed);
  s.seen.Note(name, e.signed_at);
  (void)s.seen.Save();
  if (g.json_out) {
    json out = *res;
    out["token"] = token;
    std::cout << out.dump() << "\n";
    return 0;
  }
  std::cout << token << "\n";
  std::cerr << "one-time token for machine " << name << ", valid until " << Timestamp(e.expires_at)
            << "; put it in the agent's enrollTokenFile (only a holder of this token can bind a "
               "key to this grant)\n";
  return 0;
}

int OperatorList(const Globals& g) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call("operator.list", json::object());
  if (!res) return Die(res.message(), kExitFailed);
  if (g.json_out) {
    std::cout << (*res)["operators"].dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"OPERATOR", "FINGERPRINT", "ADDED"}};
  for (const auto& o : (*res)["operators"]) {
    auto pk = ParsePublicKey(o.value("key", ""));
    rows.push_back({Printable(o.value("name", "")), pk ? pk->Fingerprint() : "?",
                    Timestamp(o.value("createdAt", std::int64_t{0}))});
  }
  PrintTable(rows);
  return 0;
}

int OperatorRemove(const Globals& g, const std::string& name) {
  return SimpleCall(g, "operator.remove", {{"name", name}},
                    "operator " + name +
                        " removed: the controller refuses its key from now on; remove it from "
                        "agents' trustedOperatorKeys too (docs/SECURITY.md)");
}

int SimpleCall(const Globals& g, const std::string& method, const json& params,
               const std::string& ok_message) {
  std::unique_ptr<Connection> conn;
  if (int rc = OpenConnection(g, &conn)) return rc;
  auto res = conn->Call(method, params);
  if (!res) return Die(res.message(), kExitFailed);
  return Done(g, *res, ok_message);
}

}  // namespace muster::cli
