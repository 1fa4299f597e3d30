// The dashboard's static assets, embedded in the binary (no CDN, no build
// step). The script only ever sets textContent and creates elements, never
// parses markup: event data comes from agents and is untrusted.
#include <array>

#include "controller/dashboard_html.h"

namespace muster {

namespace {

constexpr std::string_view kCss = R"CSS(
:root { --fg: #1d232a; --muted: #5c6670; --line: #d9dee3; --bg: #f6f7f9; --ok: #1a7f37;
        --bad: #cf222e; --run: #9a6700; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; align-items: center; gap: 1.5em; padding: .6em 1.2em; background: #24292f; color: #fff; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header .brand { font-weight: 700; letter-spacing: .04em; }
.live { margin-left: auto; font-size: 12px; padding: .1em .6em; border-radius: 1em; background: #57606a; }
.live.on { background: var(--ok); }
.live.off { background: var(--bad); }
main { padding: 1em 1.2em; }
h1 { font-size: 20px; margin: .2em 0 .6em; }
h2 { font-size: 16px; margin: 1.2em 0 .4em; }
h3 { font-size: 14px; margin: .8em 0 .3em; }
table { border-collapse: collapse; background: var(--card); width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); background: #eef1f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); }
.tag { display: inline-block; padding: 0 .45em; margin: 0 .2em .1em 0; border-radius: .3em; background: #ddf4ff; font-size: 12px; }
.phase-succeeded, .state-succeeded, .online-yes { color: var(--ok); font-weight: 600; }
.phase-failed, .phase-rolled-back, .state-failed, .state-halted, .state-aborted { color: var(--bad); font-weight: 600; }
.phase-realising, .phase-activating, .phase-confirming, .state-released, .state-running { color: var(--run); font-weight: 600; }
.phase-staged { color: #9a6700; font-weight: 600; }
.reboot-yes { color: var(--bad); font-weight: 600; }
pre.log { background: #0d1117; color: #e6edf3; padding: .6em; max-height: 28em; overflow: auto; white-space: pre-wrap; word-break: break-all; font-size: 12px; }
section.gen { background: var(--card); border: 1px solid var(--line); padding: .4em .8em; margin-bottom: .8em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .1em 1em; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
code { font-size: 12px; word-break: break-all; }
)CSS";

constexpr std::string_view kJs = R"JS('use strict';
// muster dashboard: applies the controller's events (server-sent events on
// /events) to the page. Data from agents is untrusted: it reaches the page
// through textContent and createElement only, never as markup.
(function () {
  const body = document.body;
  const page = body.dataset.page || '';
  const here = body.dataset.machine || '';
  const rolloutId = body.dataset.rollout || '';
  const live = document.getElementById('live');
  let applied = 0;

  function ts(ms) {
    if (!ms) return 'never';
    return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }
  function rowsFor(selector, machine) {
    return Array.from(document.querySelectorAll(selector))
        .filter(function (r) { return r.dataset.machine === machine; });
  }
  function cell(row, cls) { return row.querySelector('.' + cls); }
  function setText(row, cls, text, klass) {
    const c = cell(row, cls);
    if (!c) return;
    c.textContent = text;
    if (klass !== undefined) c.className = cls + ' ' + klass;
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function str(v) { return typeof v === 'string' ? v : String(v === undefined || v === null ? '' : v); }

  function generationSection(gen) {
    const list = document.getElementById('generations');
    if (!list) return null;
    let sec = Array.from(list.querySelectorAll('section.gen'))
        .find(function (s) { return s.dataset.generation === String(gen); });
    if (sec) return sec;
    sec = el('section', 'gen');
    sec.dataset.generation = String(gen);
    sec.appendChild(el('h3', '', 'Generation ' + gen));
    const t = el('table', 'events');
    const head = el('tr');
    ['Time', 'Phase', 'Detail'].forEach(function (h) { head.appendChild(el('th', '', h)); });
    t.appendChild(head);
    sec.appendChild(t);
    list.insertBefore(sec, list.firstChild);
    return sec;
  }

  const handlers = {
    status: function (d) {
      const m = str(d.machine), phase = str(d.phase);
      rowsFor('tr.machine', m).forEach(function (r) {
        setText(r, 'c-generation', str(d.generation));
        setText(r, 'c-phase', phase, 'phase-' + phase);
        setText(r, 'c-detail', str(d.detail));
        setText(r, 'c-reboot', d.rebootRequired ? 'yes' : 'no', d.rebootRequired ? 'reboot-yes' : '');
        setText(r, 'c-seen', ts(d.at));
      });
      if (page === 'machine' && m === here) {
        const p = document.getElementById('phase');
        if (p) { p.textContent = phase; p.className = 'phase-' + phase; }
        const g = document.getElementById('generation');
        if (g) g.textContent = str(d.generation);
        const sec = generationSection(d.generation);
        if (sec) {
          const tr = el('tr', 'event');
          tr.appendChild(el('td', 'muted', ts(d.at)));
          tr.appendChild(el('td', 'phase-' + phase, phase));
          tr.appendChild(el('td', '', str(d.detail)));
          sec.querySelector('table.events').appendChild(tr);
        }
      }
    },
    machine: function (d) {
      if (d.online === undefined) return;
      const m = str(d.machine);
      rowsFor('tr.machine', m).forEach(function (r) {
        setText(r, 'c-online', d.online ? 'online' : 'offline', d.online ? 'online-yes' : 'muted');
      });
      if (page === 'machine' && m === here) {
        const o = document.getElementById('online');
        if (o) { o.textContent = d.online ? 'online' : 'offline'; o.className = d.online ? 'online-yes' : 'muted'; }
      }
    },
    publish: function (d) {
      const m = str(d.machine);
      rowsFor('tr.machine', m).forEach(function (r) { setText(r, 'c-target', str(d.generation)); });
      if (page === 'machine' && m === here) generationSection(d.generation);
    },
    log: function (d) {
      if (page !== 'machine' || str(d.machine) !== here) return;
      const pre = document.getElementById('log');
      if (!pre || !Array.isArray(d.lines)) return;
      const gen = document.getElementById('log-generation');
      if (gen && gen.textContent !== str(d.generation)) {
        if (Number(d.generation) < Number(gen.textContent)) return;  // an older generation's
        gen.textContent = str(d.generation);
        while (pre.firstChild) pre.removeChild(pre.firstChild);
      }
      const prefix = '[' + str(d.stream) + '] ';
      d.lines.forEach(function (l) { pre.appendChild(document.createTextNode(prefix + str(l) + '\n')); });
      while (pre.childNodes.length > 2000) pre.removeChild(pre.firstChild);
      pre.scrollTop = pre.scrollHeight;
    },
    rollout: function (d) {
      const id = str(d.rollout);
      Array.from(document.querySelectorAll('tr.rollout'))
          .filter(function (r) { return r.dataset.rollout === id; })
          .forEach(function (r) {
            setText(r, 'c-state', str(d.state), 'state-' + str(d.state));
            setText(r, 'c-detail', str(d.detail));
            const c = d.counts || {};
            setText(r, 'c-done', String((c.succeeded || 0) + (c.failed || 0) +
                                        (c.superseded || 0) + (c.cancelled || 0)));
          });
      if (page !== 'rollout' || id !== rolloutId) return;
      const s = document.getElementById('rollout-state');
      if (s) { s.textContent = str(d.state); s.className = 'state-' + str(d.state); }
      const det = document.getElementById('rollout-detail');
      if (det) det.textContent = str(d.detail);
      (Array.isArray(d.items) ? d.items : []).forEach(function (it) {
        rowsFor('tr.item', str(it.machine)).forEach(function (r) {
          setText(r, 'c-state', str(it.state), 'state-' + str(it.state));
          setText(r, 'c-detail', str(it.detail));
          setText(r, 'c-generation', str(it.generation));
        });
      });
    },
  };

  let down = false;
  const src = new EventSource(here ? '/events?machine=' + encodeURIComponent(here) : '/events');
  src.onopen = function () {
    if (live) { live.textContent = 'live'; live.className = 'live on'; }
    // Events were missed while the stream was down: the page is stale.
    if (down) window.location.reload();
  };
  src.onerror = function () {
    down = true;
    if (live) { live.textContent = 'reconnecting'; live.className = 'live off'; }
  };
  src.onmessage = function (e) {
    let m;
    try { m = JSON.parse(e.data); } catch (err) { return; }
    const b = (m && m.body) || {};
    const h = handlers[b.topic];
    if (!h) return;
    h(b.data || {});
    applied += 1;
    body.dataset.applied = String(applied);
  };
})();
)JS";

constexpr std::string_view kIcon =
    R"SVG(<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#24292f"/><path d="M3 12V4l5 5 5-5v8" stroke="#fff" stroke-width="2" fill="none"/></svg>)SVG";

constexpr std::array<std::pair<std::string_view, DashboardAsset>, 3> kAssets = {{
    {"/static/app.css", {"text/css; charset=utf-8", kCss}},
    {"/static/app.js", {"text/javascript; charset=utf-8", kJs}},
    {"/static/icon.svg", {"image/svg+xml", kIcon}},
}};

}  // namespace

const DashboardAsset* FindDashboardAsset(std::string_view path) {
  for (const auto& [p, a] : kAssets) {
    if (p == path) return &a;
  }
  return nullptr;
}

}  // namespace muster
