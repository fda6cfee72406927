// inferplane console: polls the server's own gated endpoints every 2 s and draws what they say.
// Plain JavaScript, no dependencies, no build step. Read-only: it only ever sends GET requests.
"use strict";

(() => {
  const POLL_MS = 2000;
  const WINDOW_S = 60; // latency plots and live splits: the last minute of counters
  const AUDIT_LIMIT = 15;
  const CREDENTIAL = "inferplane.console.credential";
  const STREAM_METRICS = [
    "inferplane_stream_consumer_lag",
    "inferplane_stream_consumer_lag_seconds",
    "inferplane_stream_end_to_end_lag_seconds",
  ];
  const KEEP = /^inferplane_(requests_total|request_duration_seconds_bucket|route_decisions_total|circuit_breaker_state|fallbacks_total)/;
  const BREAKER = { 0: "closed", 1: "open", 2: "half-open" };

  const $ = (id) => document.getElementById(id);

  // -- DOM helpers (textContent only: nothing the server says is parsed as HTML) ------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("data-")) el.setAttribute(k, String(v));
      else el.setAttribute(k, String(v));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }
  const td = (label, value, cls, field) =>
    h("td", { "data-label": label, class: cls, "data-field": field }, value);
  function note(id, text) {
    const el = $(id);
    el.textContent = text || "";
    el.hidden = !text;
  }
  function badge(text, kind) {
    return h("span", { class: `badge ${kind || ""}` }, text);
  }

  // -- formatting ------------------------------------------------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
  }
  function seconds(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "–";
    if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
    if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
    return `${s.toFixed(2)} s`;
  }
  function edge(le) {
    if (le < 1e-3) return `${Math.round(le * 1e6)}µs`;
    if (le < 1) return `${+(le * 1e3).toPrecision(3)}ms`;
    return `${le}s`;
  }
  const count = (n) => (n === undefined ? "0" : Math.round(n).toLocaleString("en-US"));
  function stateKind(state) {
    if (state === "READY") return "ok";
    if (state === "LOADING" || state === "UNLOADING") return "warn";
    if (state === "UNAVAILABLE" || state === "FAILED") return "bad";
    return "";
  }

  // -- the credential -------------------------------------------------------------------------
  function credential() {
    try { return sessionStorage.getItem(CREDENTIAL) || ""; } catch (_) { return ""; }
  }
  function setCredential(value) {
    try {
      if (value) sessionStorage.setItem(CREDENTIAL, value);
      else sessionStorage.removeItem(CREDENTIAL);
    } catch (_) { /* storage off: the key lives until the page reloads */ memoryCredential = value; }
  }
  let memoryCredential = "";

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function get(path, as) {
    const headers = { accept: as === "text" ? "text/plain" : "application/json" };
    const cred = credential() || memoryCredential;
    if (cred) headers.authorization = /^bearer\s/i.test(cred) ? cred : `Bearer ${cred}`;
    const res = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (!res.ok) {
      let message = res.statusText;
      try { message = (await res.json()).error || message; } catch (_) { /* not JSON */ }
      throw new HttpError(res.status, message);
    }
    return as === "text" ? res.text() : res.json();
  }

  // -- Prometheus text format -------------------------------------------------------------------
  const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  function unescape(v) {
    return v.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }
  function parseMetrics(text) {
    const out = new Map();
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = LINE.exec(line);
      if (!m || !KEEP.test(m[1])) continue;
      const labels = {};
      if (m[2]) for (const l of m[2].matchAll(LABEL)) labels[l[1]] = unescape(l[2]);
      const value = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value });
    }
    return out;
  }

  // Counters as a flat map of key -> value, one per poll; deltas against the poll about
  // WINDOW_S ago give the live view. A server restart (a counter went down) starts over.
  const history = [];
  function flatten(metrics) {
    const flat = new Map();
    const add = (key, v) => flat.set(key, (flat.get(key) || 0) + v);
    for (const s of metrics.get("inferplane_request_duration_seconds_bucket") || []) {
      const le = s.labels.le;
      add(`lat\u0000${s.labels.model}\u0000${le}`, s.value);
      add(`latv\u0000${s.labels.model}\u0000${s.labels.version}\u0000${le}`, s.value);
    }
    for (const s of metrics.get("inferplane_requests_total") || []) {
      const l = s.labels;
      add(`req\u0000${l.model}\u0000${l.version}`, s.value);
      if (Number(l.status) >= 400) add(`err\u0000${l.model}\u0000${l.version}`, s.value);
    }
    for (const s of metrics.get("inferplane_route_decisions_total") || []) {
      add(`route\u0000${s.labels.service}\u0000${s.labels.route}`, s.value);
    }
    return flat;
  }
  function remember(flat, now) {
    const last = history[history.length - 1];
    if (last) {
      for (const [k, v] of last.flat) {
        if ((flat.get(k) || 0) < v) { history.length = 0; break; }
      }
    }
    history.push({ t: now, flat });
    while (history.length > 2 && history[1].t <= now - WINDOW_S * 1000) history.shift();
  }
  function baseline() {
    return history.length > 1 ? history[0] : null;
  }
  function windowSeconds() {
    const base = baseline();
    return base ? (history[history.length - 1].t - base.t) / 1000 : 0;
  }
  function delta(key) {
    const cur = history[history.length - 1];
    const base = baseline();
    const now = (cur && cur.flat.get(key)) || 0;
    return base ? now - (base.flat.get(key) || 0) : 0;
  }
  function total(key) {
    const cur = history[history.length - 1];
    return (cur && cur.flat.get(key)) || 0;
  }

  // cumulative buckets (les ascending, +Inf last) of one histogram, from the latest poll and the
  // window delta
  function buckets(prefix) {
    const cur = history[history.length - 1];
    if (!cur) return null;
    const les = [];
    for (const k of cur.flat.keys()) {
      if (k.startsWith(prefix)) les.push(k.slice(prefix.length));
    }
    if (!les.length) return null;
    const value = (le) => (le === "+Inf" ? Infinity : Number(le));
    les.sort((a, b) => value(a) - value(b));
    return {
      les: les.map(value),
      all: les.map((le) => total(prefix + le)),
      recent: les.map((le) => delta(prefix + le)),
    };
  }
  function quantile(q, les, cum) {
    const n = cum[cum.length - 1];
    if (!n) return null;
    const rank = q * n;
    for (let i = 0; i < cum.length; i += 1) {
      if (cum[i] >= rank) {
        if (les[i] === Infinity) return les[i - 1] ?? null;
        const lower = i === 0 ? 0 : les[i - 1];
        const before = i === 0 ? 0 : cum[i - 1];
        const inside = cum[i] - before;
        return inside > 0 ? lower + ((les[i] - lower) * (rank - before)) / inside : les[i];
      }
    }
    return null;
  }
  const perBucket = (cum) => cum.map((c, i) => c - (i ? cum[i - 1] : 0));

  // -- state ----------------------------------------------------------------------------------
  const configs = new Map(); // "model/version" -> {runtime, device, instances} | {error}
  let metricsMap = null;
  let rollouts = null; // service -> GET /inferplane/rollouts summary; null: not readable
  let ticks = 0;
  let auditQuery = null; // null: recent records; else {request_id, service, model}

  function wantConfig(name, version) {
    const key = `${name}/${version}`;
    if (configs.has(key)) return configs.get(key);
    configs.set(key, { pending: true });
    const path = `/v2/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/config`;
    get(path)
      .then((doc) => {
        const group = (doc.instance_group || [])[0] || {};
        configs.set(key, {
          runtime: doc.backend || doc.platform || "?",
          device: group.kind === "KIND_GPU" ? "gpu" : group.kind === "KIND_CPU" ? "cpu" : "?",
          instances: group.count,
        });
      })
      .catch((err) => {
        // 401 comes back on the next poll with the credential; anything else stays shown
        if (err.status === 401) configs.delete(key);
        else configs.set(key, { error: err.message });
      });
    return configs.get(key);
  }

  // -- models ---------------------------------------------------------------------------------
  function renderModels(result) {
    const body = $("models").tBodies[0];
    if (result.status === "rejected") {
      note("models-note", refusal(result.reason, "the read scope", "/inferplane/models"));
      if (result.reason.status === 401 || result.reason.status === 403) body.replaceChildren();
      return;
    }
    note("models-note", "");
    const doc = result.value;
    const budget = doc.memory_budget_bytes;
    $("memory").textContent =
      `${doc.models_resident} resident · ${bytes(doc.resident_bytes)}` +
      (budget ? ` of ${bytes(budget)} budget` : " (no memory budget)") + ` · load ${doc.load}`;
    const rows = doc.versions.map((v) => {
      const cfg = wantConfig(v.name, v.version);
      const reqKey = `${v.name}\u0000${v.version}`;
      const b = buckets(`latv\u0000${v.name}\u0000${v.version}\u0000`);
      const live = b && b.recent[b.recent.length - 1] > 0;
      const cum = b ? (live ? b.recent : b.all) : null;
      const footprint = v.footprint_bytes ?? v.reserved_bytes;
      const title = v.reason || undefined;
      return h("tr", { "data-model": v.name, "data-version": v.version },
        td("model", h("b", {}, v.name), null, "model"),
        td("version", v.version, "mono", "version"),
        td("state", h("span", { class: `badge ${stateKind(v.state)}`, title }, v.state.toLowerCase()), null, "state"),
        td("runtime", cfg.runtime || (cfg.error ? "?" : "…"), null, "runtime"),
        td("device", cfg.device ? `${cfg.device}${cfg.instances > 1 ? ` ×${cfg.instances}` : ""}` : (cfg.error ? "?" : "…"), null, "device"),
        td("footprint", bytes(footprint), "num", "footprint"),
        td("requests", count(total(`req\u0000${reqKey}`)), "num", "requests"),
        td("errors", count(total(`err\u0000${reqKey}`)), "num", "errors"),
        td("p50", cum ? seconds(quantile(0.5, b.les, cum)) : "–", "num", "p50"),
        td("p95", cum ? seconds(quantile(0.95, b.les, cum)) : "–", "num", "p95"),
      );
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 10, class: "empty" }, "no models in this server's repository")));
    body.replaceChildren(...rows);
  }

  // -- services -------------------------------------------------------------------------------
  function breakerOf(model, version) {
    for (const s of (metricsMap && metricsMap.get("inferplane_circuit_breaker_state")) || []) {
      if (s.labels.model === model && s.labels.version === version) return BREAKER[s.value] || String(s.value);
    }
    return null;
  }
  function breakerBadge(state) {
    if (!state) return "–";
    return badge(state, state === "closed" ? "ok" : state === "open" ? "bad" : "warn");
  }
  const ROLLOUT_KIND = { running: "warn", paused: "warn", promoted: "ok", rolled_back: "bad", aborted: "bad", unreadable: "bad" };
  // The rollout's badge for the card's title: its live state, else what the policy declares.
  function rolloutBadge(name, spec) {
    const live = rollouts && rollouts.get(name);
    if (live) return badge(`rollout ${live.status.replace("_", " ")}`, ROLLOUT_KIND[live.status] || "");
    if (spec && spec.rollout) return badge(rollouts ? "rollout declared, not started" : "rollout declared", "warn");
    return badge("no rollout", "");
  }
  // Stages as chips (shadow, each step's weight) marked passed, failed or current, then the
  // candidate's share and the controller's last reason.
  function rolloutView(name) {
    const live = rollouts && rollouts.get(name);
    if (!live) return null;
    if (live.status === "unreadable") {
      return h("div", { class: "rollout", "data-rollout": live.status },
        h("div", { class: "muted small", "data-field": "rollout-reason" }, live.reason));
    }
    const verdicts = new Map((live.history || []).map((x) => [x.phase, x.verdict]));
    const open = live.status === "running" || live.status === "paused";
    const chip = (label, key, current) => {
      const verdict = verdicts.get(key);
      const state = verdict || (current && open ? "current" : "pending");
      const mark = verdict === "pass" ? " ✓" : verdict === "fail" ? " ✗" : state === "current" ? " ●" : "";
      return h("span", { class: `stage ${state}`, "data-stage": key, "data-state": state }, label + mark);
    };
    const chips = [];
    if (verdicts.has("shadow phase") || live.phase === "shadow") chips.push(chip("shadow", "shadow phase", live.phase === "shadow"));
    (live.steps || []).forEach((w, i) => chips.push(chip(`${w}%`, `step ${i + 1}`, live.phase === "step" && live.step === i)));
    return h("div", { class: "rollout", "data-rollout": live.status },
      h("div", { class: "stages" }, ...chips,
        h("span", { class: "muted small", "data-field": "rollout-weight" },
          `${live.candidate} at ${live.weight}% · against ${live.primary}`)),
      live.reason ? h("div", { class: "muted small", "data-field": "rollout-reason" }, live.reason) : null,
    );
  }

  function routeCounts(service) {
    const prefix = `route\u0000${service}\u0000`;
    const routes = new Map();
    const cur = history[history.length - 1];
    if (!cur) return routes;
    for (const k of cur.flat.keys()) {
      if (k.startsWith(prefix)) {
        const route = k.slice(prefix.length);
        routes.set(route, { total: total(k), recent: delta(k) });
      }
    }
    return routes;
  }
  function metricServices() {
    const names = new Set();
    for (const s of (metricsMap && metricsMap.get("inferplane_route_decisions_total")) || []) names.add(s.labels.service);
    return [...names].sort();
  }

  function renderServices(result) {
    const box = $("services");
    let services = {};
    if (result.status === "fulfilled") {
      note("services-note", "");
      services = result.value.services || {};
      $("services-source").textContent = result.value.source ? `policy: ${result.value.source}` : "no policy file";
    } else {
      const err = result.reason;
      note("services-note", err.status === 403
        ? "The traffic policy (weights, breakers) needs the admin scope (GET /inferplane/services); route counts below come from /metrics."
        : refusal(err, "the admin scope", "/inferplane/services"));
      $("services-source").textContent = "";
      for (const name of metricServices()) services[name] = null;
    }
    const names = Object.keys(services).sort();
    if (!names.length) {
      box.replaceChildren(h("p", { class: "muted" }, result.status === "fulfilled"
        ? "No services: this server has no traffic policy (services.yaml); models are called by name."
        : "No service traffic seen in /metrics yet."));
      return;
    }
    box.replaceChildren(...names.map((name) => renderService(name, services[name])));
  }

  function renderService(name, spec) {
    const counts = routeCounts(name);
    const win = windowSeconds();
    const rows = [];
    const split = [];
    const seen = new Set();
    let recentAll = 0;
    for (const c of counts.values()) recentAll += c.recent;
    const weights = spec ? spec.routes.reduce((s, r) => s + (r.weight || 0), 0) : 0;
    const routeRow = (route, target, resolved, weight, breaker, colour) => {
      seen.add(route);
      const c = counts.get(route) || { total: 0, recent: 0 };
      const share = recentAll > 0 ? `${((100 * c.recent) / recentAll).toFixed(0)}%` : "–";
      return h("tr", { "data-route": route },
        td("route", h("span", {}, colour !== null ? h("span", { class: `swatch c${colour}` }) : null, route), null, "route"),
        td("target", target, "mono", "target"),
        td("resolves to", resolved, "mono", "resolved"),
        td("weight", weight, "num", "weight"),
        td(`live (${Math.round(win)} s)`, share, "num", "live"),
        td("calls", count(c.total), "num", "calls"),
        td("breaker", breakerBadge(breaker), null, "breaker"),
      );
    };
    if (spec) {
      spec.routes.forEach((r, i) => {
        const pct = weights > 0 ? (100 * r.weight) / weights : 0;
        split.push(h("span", { class: `c${i % 5}`, title: `${r.route} ${pct.toFixed(0)}%`, "data-route": r.route, "data-weight": r.weight }));
        const resolved = r.error ? `error: ${r.error}` : `${r.model}@${r.resolved_version}${r.state && r.state !== "READY" ? ` (${r.state.toLowerCase()})` : ""}`;
        rows.push(routeRow(r.route, `${r.model}@${r.version ?? "latest"}`, resolved,
          `${pct.toFixed(0)}%`, r.breaker || breakerOf(r.model, r.resolved_version), i % 5));
      });
      for (const m of spec.match || []) {
        const t = m.target || {};
        const rule = m.tenant ? `tenant in ${(m.values || []).join(",")}` : `${m.header}=${(m.values || []).join(",")}`;
        rows.push(routeRow(m.route, `${t.model}@${t.version ?? "latest"}`, t.error ? `error: ${t.error}` : `${t.model}@${t.resolved_version}`,
          `if ${rule}`, t.breaker || breakerOf(t.model, t.resolved_version), null));
      }
    }
    for (const [route] of [...counts].sort()) {
      if (!seen.has(route)) rows.push(routeRow(route, "–", "–", "–", null, null));
    }
    // the split bar's segments get their widths here (CSSOM: allowed by the page's CSP)
    split.forEach((seg) => {
      const w = Number(seg.getAttribute("data-weight"));
      seg.style.width = `${weights > 0 ? (100 * w) / weights : 0}%`;
    });
    const facts = [];
    if (spec) {
      if (spec.sticky) facts.push(["sticky", spec.sticky.header ? `header ${spec.sticky.header}` : "tenant"]);
      if (spec.shadow) facts.push(["shadow", `${spec.shadow.model}@${spec.shadow.resolved_version ?? spec.shadow.version} ${spec.shadow.percent ?? 100}%`]);
      if (spec.fallback) facts.push(["fallback", `${spec.fallback.model}@${spec.fallback.version ?? "latest"}`]);
      if (spec.cache) facts.push(["cache", `${spec.cache.size} entries, ${spec.cache.ttl_s} s`]);
      if (spec.timeout_ms) facts.push(["timeout", `${spec.timeout_ms} ms`]);
      if (spec.retries) facts.push(["retries", `${spec.retries.attempts}`]);
      if (spec.breaker) facts.push(["breaker", `${spec.breaker.consecutive_failures} failures or ${Math.round(spec.breaker.error_rate * 100)}% of ${spec.breaker.window}, ${spec.breaker.cooldown_s} s cooldown`]);
    }
    return h("div", { class: "service", "data-service": name },
      h("h3", {}, name, rolloutBadge(name, spec),
        h("span", { class: "muted small", "data-field": "calls-recent" }, `${count(recentAll)} calls in the last ${Math.round(win)} s`)),
      rolloutView(name),
      split.length ? h("div", { class: "split", title: "configured weights" }, split) : null,
      h("div", { class: "scroll" }, h("table", { class: "rows" },
        h("thead", {}, h("tr", {}, ["route", "target", "resolves to", "weight", "live", "calls", "breaker"]
          .map((t, i) => h("th", { class: i >= 3 && i <= 5 ? "num" : null }, t)))),
        h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 7, class: "empty" }, "no calls yet"))))),
      facts.length ? h("div", { class: "facts" }, facts.map(([k, v]) => h("span", {}, `${k} `, h("b", {}, v)))) : null,
    );
  }

  // -- latency --------------------------------------------------------------------------------
  const plots = new Map(); // model -> {el, canvas, q}
  function renderLatency(result) {
    const box = $("latency");
    if (result.status === "rejected") {
      note("latency-note", refusal(result.reason, "the read scope on every model", "/metrics") +
        (result.reason.status === 403 ? " (or `metrics: open` in the access file)" : ""));
      return;
    }
    note("latency-note", "");
    const win = windowSeconds();
    $("latency-window").textContent = `inferplane_request_duration_seconds · last ${Math.round(win)} s`;
    const models = new Set();
    const cur = history[history.length - 1];
    for (const k of cur.flat.keys()) if (k.startsWith("lat\u0000")) models.add(k.split("\u0000")[1]);
    if (!models.size) {
      box.replaceChildren(h("p", { class: "muted" }, "No requests yet: plots appear with the first answer of each model."));
      plots.clear();
      return;
    }
    const sorted = [...models].sort();
    for (const model of sorted) {
      let p = plots.get(model);
      if (!p) {
        const canvas = h("canvas", { role: "img", "aria-label": `latency histogram of ${model}` });
        const q = h("div", { class: "q" });
        const el = h("div", { class: "plot", "data-model": model }, h("h3", {}, model), q, canvas);
        p = { el, canvas, q };
        plots.set(model, p);
      }
      const b = buckets(`lat\u0000${model}\u0000`);
      const recentN = b.recent[b.recent.length - 1];
      const allN = b.all[b.all.length - 1];
      const live = recentN > 0;
      const cum = live ? b.recent : b.all;
      p.canvas.setAttribute("data-window-count", String(recentN));
      p.canvas.setAttribute("data-total", String(allN));
      p.canvas.setAttribute("data-buckets", perBucket(cum).join(","));
      p.q.textContent = `${live ? `${count(recentN)} in ${Math.round(win)} s` : `${count(allN)} since start`} · ` +
        `p50 ${seconds(quantile(0.5, b.les, cum))} · p95 ${seconds(quantile(0.95, b.les, cum))} · p99 ${seconds(quantile(0.99, b.les, cum))}`;
      p.live = live;
      p.b = b;
    }
    for (const model of [...plots.keys()]) if (!models.has(model)) plots.delete(model);
    const els = sorted.map((m) => plots.get(m).el);
    if (els.length !== box.children.length || els.some((el, i) => box.children[i] !== el)) box.replaceChildren(...els);
    for (const model of sorted) draw(plots.get(model));
  }

  function draw(p) {
    const { canvas, b, live } = p;
    const css = getComputedStyle(document.documentElement);
    const ink = css.getPropertyValue("--muted").trim() || "#666";
    const bar = css.getPropertyValue(live ? "--plot" : "--plot-soft").trim() || "#36c";
    const grid = css.getPropertyValue("--line").trim() || "#ddd";
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 240;
    const ht = canvas.clientHeight || 110;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(ht * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(ht * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, ht);
    const counts = perBucket(live ? b.recent : b.all);
    const padB = 16;
    const padT = 12;
    const n = counts.length;
    const bw = w / n;
    const max = Math.max(1, ...counts);
    ctx.strokeStyle = grid;
    ctx.beginPath();
    ctx.moveTo(0, ht - padB + 0.5);
    ctx.lineTo(w, ht - padB + 0.5);
    ctx.stroke();
    ctx.fillStyle = bar;
    counts.forEach((c, i) => {
      if (c <= 0) return;
      const bh = Math.max(1, ((ht - padB - padT) * c) / max);
      ctx.fillRect(i * bw + 1, ht - padB - bh, Math.max(1, bw - 2), bh);
    });
    ctx.fillStyle = ink;
    ctx.font = "10px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.fillText(`${count(max)} max`, 2, 0);
    ctx.textAlign = "center";
    b.les.forEach((le, i) => {
      if (![0.001, 0.01, 0.1, 1].includes(le)) return;
      const x = (i + 1) * bw;
      ctx.fillText(edge(le), Math.min(Math.max(x, 14), w - 14), ht - padB + 3);
    });
  }

  // -- audit ----------------------------------------------------------------------------------
  function auditPath() {
    const params = new URLSearchParams();
    if (auditQuery) {
      for (const [k, v] of Object.entries(auditQuery)) if (v) params.set(k, v);
      params.set("limit", "100");
    } else {
      params.set("limit", String(AUDIT_LIMIT));
    }
    return `/inferplane/audit?${params}`;
  }
  function renderAudit(result) {
    const body = $("audit").tBodies[0];
    const table = $("audit");
    if (result.status === "rejected") {
      const err = result.reason;
      const off = err.status === 404;
      note("audit-note", off ? "audit is off (serve --audit-sink PATH): this server keeps no audit trail."
        : err.status === 403 ? "Audit records need the admin scope (GET /inferplane/audit): they name every tenant's callers."
          : refusal(err, "the admin scope", "/inferplane/audit"));
      $("audit-card").setAttribute("data-audit", off ? "off" : "refused");
      table.hidden = true;
      $("audit-sink").textContent = "";
      return;
    }
    const doc = result.value;
    $("audit-card").setAttribute("data-audit", "on");
    table.hidden = false;
    $("audit-sink").textContent = `${doc.sink} · ${count(doc.written)} written${doc.dropped ? ` · ${count(doc.dropped)} dropped` : ""}`;
    const wanted = auditQuery && auditQuery.request_id;
    note("audit-note", auditQuery
      ? `${doc.records.length} record${doc.records.length === 1 ? " matches" : "s match"} ${Object.entries(auditQuery).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`).join(", ")}`
      : "");
    const rows = doc.records.map((r) => h("tr", {
      "data-request-id": r.request_id,
      class: [r.status >= 400 ? "failed" : "", wanted && r.request_id === wanted ? "hit" : ""].join(" ").trim() || null,
      // The trace a record belongs to, to look it up in Jaeger/Tempo (docs/observability.md).
      title: [r.error, r.trace_id && `trace ${r.trace_id}`].filter(Boolean).join("\n") || undefined,
    },
    td("time", r.time_iso.replace("T", " ").replace("Z", ""), "mono", "time"),
    td("request id", r.request_id, "mono", "request_id"),
    td("service", r.service, null, "service"),
    td("model", r.model || "–", null, "model"),
    td("version", r.version || "–", "mono", "version"),
    td("route", r.route, null, "route"),
    td("latency", `${r.latency_ms.toFixed(2)} ms`, "num", "latency"),
    td("status", String(r.status), "num code", "status"),
    td("tenant", r.tenant || r.principal || "–", null, "tenant"),
    ));
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 9, class: "empty" }, auditQuery ? "no audit record matches" : "no audit records yet")));
    body.replaceChildren(...rows);
  }

  // -- streams --------------------------------------------------------------------------------
  // Stream workers report on their own metrics port; the server reads them (or Prometheus)
  // when started with --stream-metrics URL or --prometheus URL: GET /inferplane/streams.
  function renderStreams(result) {
    const box = $("streams");
    if (result.status === "rejected") {
      box.replaceChildren(h("p", { class: "muted", "data-field": "stream-lag" },
        refusal(result.reason, "the read scope on every model", "/inferplane/streams")));
      return;
    }
    const view = result.value;
    if (!view.from) {
      box.replaceChildren(
        h("p", { "data-field": "stream-lag" }, "stream lag: see Prometheus / dashboard. ",
          h("span", { class: "muted" }, "Stream workers (inferplane stream --metrics-port N) report lag on their own metrics port; start the server with --stream-metrics URL (each worker's /metrics) or --prometheus URL to see them here. Their series:")),
        h("ul", {}, STREAM_METRICS.map((m) => h("li", {}, h("code", {}, m)))),
      );
      return;
    }
    const num = (v) => (v === null || v === undefined ? "–" : count(v));
    const rows = view.workers.map((w) => h("tr", { "data-worker": w.consumer || w.instance, "data-up": String(w.up) },
      td("worker", w.consumer || w.instance, "mono", "worker"),
      td("source", w.source || "–", "mono", "source"),
      td("group", w.group || "–", null, "group"),
      td("target", w.target || "–", "mono", "target"),
      td("lag", w.up ? num(w.lag) : badge("down", "bad"), "num", "lag"),
      td("lag (s)", w.up ? seconds(w.lag_seconds) : "–", "num", "lag-seconds"),
      td("in", num(w.events_in), "num", "events-in"),
      td("out", num(w.events_out), "num", "events-out"),
      td("dead letters", num(w.events_dlq), "num", "events-dlq"),
    ));
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "no stream workers reporting")));
    const failed = view.workers.filter((w) => !w.up).map((w) => w.error);
    box.replaceChildren(
      h("p", { class: "muted small", "data-field": "streams-from" }, `from ${view.from}`),
      view.error ? h("p", { class: "muted", "data-field": "streams-error" }, view.error) : null,
      h("div", { class: "scroll" }, h("table", { class: "rows" },
        h("thead", {}, h("tr", {}, ["worker", "source", "group", "target", "lag", "lag (s)", "in", "out", "dead letters"]
          .map((t, i) => h("th", { class: i >= 4 ? "num" : null }, t)))),
        h("tbody", {}, rows))),
      failed.length ? h("p", { class: "muted small" }, failed.join("; ")) : null,
    );
  }

  // -- the poll -------------------------------------------------------------------------------
  function refusal(err, scope, path) {
    if (err.status === 401) return `Needs a credential (${path}): ${err.message}`;
    if (err.status === 403) return `The credential lacks ${scope} (${path}): ${err.message}`;
    if (!err.status) return `No answer from the server (${path}).`;
    return `${path}: ${err.status} ${err.message}`;
  }
  // `outcomes`: the error of each data request of this poll, null where it succeeded
  function showAuth(outcomes) {
    const errors = outcomes.filter(Boolean);
    const unauth = errors.find((e) => e.status === 401);
    const forbidden = errors.filter((e) => e.status === 403);
    const bar = $("auth");
    const has = Boolean(credential() || memoryCredential);
    $("auth-toggle").hidden = !(has || unauth || forbidden.length);
    if (unauth) {
      $("auth-message").textContent = has
        ? `The credential was refused (${unauth.message}). Paste another API key or bearer token.`
        : "This server needs a credential: paste an API key or bearer token.";
      bar.hidden = false;
    } else if (forbidden.length && forbidden.length === outcomes.length) {
      $("auth-message").textContent = `This credential may not read this server (${forbidden[0].message}). Paste another one.`;
      bar.hidden = false;
    } else if (!bar.dataset.opened) {
      bar.hidden = true;
    }
    document.body.setAttribute("data-auth", unauth ? "needed" : forbidden.length ? "partial" : "ok");
  }
  function setStatus(kind, text) {
    $("status-dot").className = `dot ${kind}`;
    $("status-text").textContent = text;
  }

  let timer = null;
  let running = false;
  async function tick() {
    if (running) return;
    running = true;
    clearTimeout(timer);
    const started = Date.now();
    try {
      const [models, metrics, services, audit, live, streams] = await Promise.allSettled([
        get("/inferplane/models"),
        get("/metrics", "text"),
        get("/inferplane/services"),
        get(auditPath()),
        get("/inferplane/rollouts"),
        get("/inferplane/streams"),
      ]);
      // Rollouts need the read scope on every service; without it the cards say only what
      // the policy declares.
      rollouts = live.status === "fulfilled"
        ? new Map((live.value.rollouts || []).map((r) => [r.service, r]))
        : null;
      if (metrics.status === "fulfilled") {
        metricsMap = parseMetrics(metrics.value);
        remember(flatten(metricsMap), Date.now());
      }
      renderModels(models);
      renderServices(services);
      if (metrics.status === "fulfilled") renderLatency(metrics);
      else renderLatency(metrics);
      renderAudit(audit);
      renderStreams(streams);
      const failed = [models, metrics, services, audit].filter((r) => r.status === "rejected").map((r) => r.reason);
      showAuth([models, metrics, services, audit].map((r) => (r.status === "rejected" ? r.reason : null)));
      const down = failed.length && failed.every((e) => !e.status);
      const time = new Date().toLocaleTimeString("en-GB", { hour12: false });
      if (down) setStatus("down", `server unreachable · retrying (${time})`);
      else if (failed.some((e) => e.status === 401)) setStatus("stale", `needs a credential · ${time}`);
      else setStatus("live", `live · every ${POLL_MS / 1000} s · ${time}`);
    } catch (err) {
      setStatus("down", `console error: ${err.message}`);
      throw err;
    } finally {
      ticks += 1;
      document.body.setAttribute("data-ticks", String(ticks));
      running = false;
      timer = setTimeout(tick, Math.max(200, POLL_MS - (Date.now() - started)));
    }
  }

  function start() {
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("auth-key").value.trim();
      setCredential(value);
      memoryCredential = value;
      $("auth-key").value = "";
      delete $("auth").dataset.opened;
      configs.clear();
      tick();
    });
    $("auth-forget").addEventListener("click", () => {
      setCredential("");
      memoryCredential = "";
      configs.clear();
      tick();
    });
    $("auth-toggle").addEventListener("click", () => {
      const bar = $("auth");
      bar.hidden = !bar.hidden;
      if (bar.hidden) delete bar.dataset.opened;
      else { bar.dataset.opened = "1"; $("auth-key").focus(); }
    });
    $("audit-search").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const q = {
        request_id: $("audit-request-id").value.trim(),
        service: $("audit-service").value.trim(),
        model: $("audit-model").value.trim(),
      };
      auditQuery = Object.values(q).some(Boolean) ? q : null;
      tick();
    });
    $("audit-clear").addEventListener("click", () => {
      for (const id of ["audit-request-id", "audit-service", "audit-model"]) $(id).value = "";
      auditQuery = null;
      tick();
    });
    let resize = null;
    window.addEventListener("resize", () => {
      clearTimeout(resize);
      resize = setTimeout(() => plots.forEach((p) => p.b && draw(p)), 100);
    });
    tick();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
