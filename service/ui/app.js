// optserve dashboard: plain JavaScript over the public API, charts by the bundled uPlot.
// The table lists the tenant's sessions (GET /v1/sessions, most recently updated first);
// ids the user adds (or passes as ?session=<id>) and the listing does not show (beyond its
// limit) are remembered in localStorage and read one by one. An API key, asked for when
// the API answers 401, is kept in sessionStorage and sent as "Authorization: Bearer <key>".
(function () {
  "use strict";

  const REFRESH_MS = 1500;
  const SCHEDULE_MS = 5000;
  const HISTORY_LIMIT = 1000;
  const LIST_LIMIT = 100;
  const IDS_KEY = "optserve.sessions";
  const API_KEY = "optserve.apiKey";

  const $ = (sel) => document.querySelector(sel);
  const state = { ids: loadIds(), listed: [], truncated: false, docs: {}, selected: null, charts: {}, scheduleAt: 0, scheduleStep: -1, scheduleUrl: null, needKey: false };

  function loadIds() {
    try {
      const ids = JSON.parse(localStorage.getItem(IDS_KEY) || "[]");
      return Array.isArray(ids) ? ids.filter((x) => typeof x === "string") : [];
    } catch (e) {
      return [];
    }
  }
  function saveIds() { localStorage.setItem(IDS_KEY, JSON.stringify(state.ids)); }
  function addId(id) {
    id = (id || "").trim();
    if (!id) return;
    if (!state.ids.includes(id)) { state.ids.unshift(id); saveIds(); }
  }
  function removeId(id) {
    state.ids = state.ids.filter((x) => x !== id);
    delete state.docs[id];
    saveIds();
    if (state.selected === id) select(null);
  }

  // --- HTTP ---------------------------------------------------------------------------
  class Unauthorized extends Error {}

  async function api(path, asBlob) {
    const headers = { Accept: asBlob ? "image/png" : "application/json" };
    const key = sessionStorage.getItem(API_KEY);
    if (key) headers.Authorization = "Bearer " + key;
    const res = await fetch(path, { headers, cache: "no-store" });
    if (res.status === 401) throw new Unauthorized("401");
    if (res.status === 404) return null;
    if (!res.ok) throw new Error(path + ": HTTP " + res.status);
    return asBlob ? res.blob() : res.json();
  }

  function askForKey() {
    state.needKey = true;
    $("#key-form").hidden = false;
    setStatus("the server needs an API key");
  }

  function setStatus(text) { $("#status").textContent = text; }

  // --- sessions table -----------------------------------------------------------------
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (typeof x === "number") return Number.isInteger(x) ? String(x) : x.toPrecision(4);
    return String(x);
  }

  // the ids added by hand that the listing does not show
  function extraIds() {
    const listed = new Set(state.listed.map((s) => s.id));
    return state.ids.filter((id) => !listed.has(id));
  }

  function renderTable() {
    const body = $("#sessions tbody");
    body.textContent = "";
    const rows = state.listed.map((s) => ({ id: s.id, cells: [s.optimizer, fmt(s.step), fmt(s.lr)], added: false }));
    for (const id of extraIds()) {
      const doc = state.docs[id];
      const cells = doc
        ? [doc.optimizer && doc.optimizer.name, fmt(doc.step), fmt(doc.lr)]
        : [doc === null ? "not found" : "…", "", ""];
      rows.push({ id, cells, added: true, missing: doc === null });
    }
    for (const row of rows) {
      const id = row.id;
      const tr = document.createElement("tr");
      tr.dataset.id = id;
      if (id === state.selected) tr.classList.add("selected");
      if (row.missing) tr.classList.add("missing");
      [id, ...row.cells].forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 0) { td.className = "id"; td.title = id; }
        tr.appendChild(td);
      });
      const td = document.createElement("td");
      if (row.added) {
        const rm = document.createElement("button");
        rm.type = "button";
        rm.textContent = "×";
        rm.title = "forget this session";
        rm.addEventListener("click", (ev) => { ev.stopPropagation(); removeId(id); renderTable(); });
        td.appendChild(rm);
      }
      tr.appendChild(td);
      tr.addEventListener("click", () => select(id));
      body.appendChild(tr);
    }
    $("#sessions-note").textContent = state.truncated
      ? `the ${LIST_LIMIT} most recently updated sessions; add an older one by its id`
      : "";
  }

  // --- charts -------------------------------------------------------------------------
  function makeChart(el, label, color, logY) {
    const opts = {
      width: Math.max(300, el.clientWidth || 420),
      height: 220,
      scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
      axes: [{ label: "step" }, {}],
      series: [{ label: "step" }, { label, stroke: color, width: 1.5, spanGaps: true, points: { show: false } }],
      legend: { show: true },
    };
    return new uPlot(opts, [[], []], el);
  }

  function ensureCharts() {
    if (state.charts.lr) return;
    state.charts.lr = makeChart($("#chart-lr"), "lr", "#1565c0", false);
    state.charts.loss = makeChart($("#chart-loss"), "loss", "#c62828", false);
    state.charts.grad = makeChart($("#chart-grad"), "grad norm", "#2e7d32", false);
    window.optserveCharts = state.charts; // for tests and the console
    window.addEventListener("resize", () => {
      for (const [name, chart] of Object.entries(state.charts)) {
        const el = $("#chart-" + name);
        chart.setSize({ width: Math.max(300, el.clientWidth), height: 220 });
      }
    });
  }

  function series(entries) {
    // entries are most recent first: walk them oldest first, one value per step
    const lr = new Map(), loss = new Map(), grad = new Map();
    for (let i = entries.length - 1; i >= 0; i--) {
      const e = entries[i];
      if (e.kind === "step") {
        if (typeof e.lr === "number") lr.set(e.step, e.lr);
        if (typeof e.grad_norm === "number") grad.set(e.step, e.grad_norm);
      }
      if (typeof e.loss === "number") loss.set(e.step, e.loss);
    }
    const toData = (m) => {
      const xs = [...m.keys()].sort((a, b) => a - b);
      return [xs, xs.map((x) => m.get(x))];
    };
    return { lr: toData(lr), loss: toData(loss), grad: toData(grad) };
  }

  function setChart(name, data) {
    state.charts[name].setData(data);
    $("#chart-" + name).dataset.points = String(data[0].length);
  }

  async function refreshDetail() {
    const id = state.selected;
    if (!id) return;
    ensureCharts();
    const path = "/v1/sessions/" + encodeURIComponent(id);
    const [doc, hist] = await Promise.all([api(path), api(path + "/history?limit=" + HISTORY_LIMIT)]);
    if (id !== state.selected) return;
    if (doc === null || hist === null) { $("#detail-info").textContent = "no such session (deleted, expired, or another tenant's)"; return; }
    const s = series(hist.entries);
    setChart("lr", s.lr);
    setChart("loss", s.loss);
    setChart("grad", s.grad);
    const sched = doc.schedule ? doc.schedule.name || JSON.stringify(doc.schedule) : "constant";
    $("#detail-info").textContent = `${doc.optimizer.name}, schedule ${sched}, step ${doc.step}, version ${doc.version}, lr ${fmt(doc.lr)}, ${hist.entries.length} history entries (keeps ${hist.limit})`;
    const now = Date.now();
    if (doc.step !== state.scheduleStep && now - state.scheduleAt >= SCHEDULE_MS) {
      state.scheduleAt = now;
      state.scheduleStep = doc.step;
      const blob = await api("/v1/sessions/" + encodeURIComponent(id) + "/schedule.png", true);
      if (blob && id === state.selected) {
        if (state.scheduleUrl) URL.revokeObjectURL(state.scheduleUrl);
        state.scheduleUrl = URL.createObjectURL(blob);
        $("#schedule-img").src = state.scheduleUrl;
      }
    }
  }

  function select(id) {
    state.selected = id;
    state.scheduleAt = 0;
    state.scheduleStep = -1;
    $("#detail").hidden = !id;
    if (id) {
      $("#detail-id").textContent = id;
      $("#detail-info").textContent = "loading…";
      $("#schedule-img").removeAttribute("src");
      ensureCharts();
      for (const name of Object.keys(state.charts)) setChart(name, [[], []]);
      const url = new URL(location.href);
      url.searchParams.set("session", id);
      history.replaceState(null, "", url);
    }
    renderTable();
    if (id) tick();
  }

  // --- the refresh loop ---------------------------------------------------------------
  let running = false;
  async function tick() {
    if (running || state.needKey) return;
    running = true;
    try {
      const list = await api("/v1/sessions?limit=" + LIST_LIMIT);
      state.listed = list ? list.sessions : [];
      state.truncated = !!(list && list.truncated);
      const extra = extraIds();
      const docs = await Promise.all(
        extra.map((id) => api("/v1/sessions/" + encodeURIComponent(id)))
      );
      extra.forEach((id, i) => { state.docs[id] = docs[i]; });
      renderTable();
      await refreshDetail();
      setStatus("updated " + new Date().toLocaleTimeString());
    } catch (e) {
      if (e instanceof Unauthorized) askForKey();
      else setStatus("error: " + e.message);
    } finally {
      running = false;
    }
  }

  // --- start --------------------------------------------------------------------------
  $("#add-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("#add-input").value.trim();
    $("#add-input").value = "";
    addId(id);
    renderTable();
    tick();
  });
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(API_KEY, key);
    $("#key-input").value = "";
    $("#key-form").hidden = true;
    $("#forget-key").hidden = false;
    state.needKey = false;
    tick();
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(API_KEY);
    $("#forget-key").hidden = true;
    tick();
  });
  $("#forget-key").hidden = !sessionStorage.getItem(API_KEY);

  const wanted = new URL(location.href).searchParams.get("session");
  if (wanted) addId(wanted);
  renderTable();
  if (wanted) select(wanted);
  tick();
  setInterval(tick, REFRESH_MS);
})();
