// pacs-ai dashboard: fetches the admin API with the bearer token kept in this
// tab's sessionStorage. Every value is inserted as text, never as HTML.
"use strict";

const TOKEN_KEY = "pacs-ai-token";
let selectedStudy = null;
let selectedPatient = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const init = { ...options, headers };
  if (options.method === "POST") {
    // the API takes writes only as JSON (a cross-site form cannot send that)
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json || {});
    delete init.json;
  }
  const response = await fetch(path, init);
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => ({}));
  if (!response.ok && response.status !== 503) {
    throw new Error(body.detail || response.status + " " + response.statusText);
  }
  return { status: response.status, body };
}

// -- small DOM helpers ------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function pill(text, cls) { return el("span", { class: "pill " + (cls || text) }, text); }

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function seconds(from, to) {
  if (!from || !to) return "–";
  const s = (new Date(to) - new Date(from)) / 1000;
  return s < 60 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function uidCell(uid) { return el("td", { class: "uid", title: uid }, uid); }

function fill(tableId, rows, emptyText, columns) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, emptyText)));
    return body;
  }
  return body;
}

function toast(text) {
  const node = document.getElementById("toast");
  node.textContent = text;
  node.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.hidden = true; }, 6000);
}

function deliverySummary(counts) {
  const parts = Object.entries(counts || {}).map(([status, n]) => n + " " + status);
  return parts.length ? parts.join(" · ") : "–";
}

function findingsCell(study) {
  const td = el("td", { class: "findings" });
  if (study.findings && study.findings.length) {
    for (const f of study.findings) td.append(pill(f, "finding"));
  } else if (study.status === "done") {
    td.append(el("span", { class: "muted" }, "none present"));
  } else {
    td.append(el("span", { class: "muted" }, "–"));
  }
  return td;
}

// -- actions ----------------------------------------------------------------------

async function reprocess(studyUid, button) {
  button.disabled = true;
  try {
    const { body } = await api(
      "/api/studies/" + encodeURIComponent(studyUid) + "/reprocess", { method: "POST" });
    toast("Reprocess queued: job " + body.job.id + " for study " + studyUid);
  } catch (err) {
    if (err instanceof Unauthorized) return signIn();
    toast("Reprocess refused: " + err.message);
  }
  await refresh();
}

async function resend(studyUid, button) {
  button.disabled = true;
  try {
    const { body } = await api(
      "/api/studies/" + encodeURIComponent(studyUid) + "/resend", { method: "POST" });
    toast("Resend queued: " + body.deliveries.length + " object(s) of study " + studyUid);
  } catch (err) {
    if (err instanceof Unauthorized) return signIn();
    toast("Resend refused: " + err.message);
  }
  await refresh();
}

// -- rendering --------------------------------------------------------------------

function renderTiles(summary, studies) {
  const jobs = summary.jobs || {};
  const deliveries = summary.deliveries || {};
  const tiles = [
    ["studies shown", studies.items.length + (studies.next_offset !== null ? "+" : "")],
    ["jobs queued", jobs.queued || 0],
    ["jobs running", jobs.running || 0],
    ["jobs done", jobs.done || 0],
    ["jobs failed", jobs.failed || 0],
    ["deliveries pending", deliveries.pending || 0],
    ["deliveries sent", deliveries.sent || 0],
    ["deliveries failed", deliveries.failed || 0],
  ];
  const box = document.getElementById("tiles");
  box.replaceChildren(...tiles.map(([label, n]) =>
    el("div", { class: "tile" }, el("div", { class: "n" }, n), el("div", { class: "l" }, label))));
}

function renderStorage(space) {
  // the free-space watermark (PACS_AI_MIN_FREE_MB): below it the listener refuses instances
  const box = document.getElementById("disk-warning");
  if (space && space.below_watermark) {
    box.textContent = "Disk space low: " + space.free_mb + " MiB free on the storage, below " +
      "the watermark of " + space.min_free_mb + " MiB (PACS_AI_MIN_FREE_MB). New instances " +
      "are refused until space is freed.";
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

function age(secondsText) {
  const s = Number(secondsText);
  if (!Number.isFinite(s)) return "–";
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}

function renderBacklog(backlog) {
  // pending deliveries per destination; overdue: pending longer than PACS_AI_DELIVERY_ALERT_MINUTES
  const rows = (backlog.destinations || []).filter((d) => d.pending > 0);
  const section = document.getElementById("backlog-section");
  section.classList.toggle("alert", backlog.overdue > 0);
  document.getElementById("backlog-hint").textContent = backlog.overdue > 0
    ? backlog.overdue + " object(s) waiting longer than " + backlog.alert_minutes +
      " min: is the destination down? They are retried until it is back (at most " +
      backlog.max_age_hours + " h)."
    : "Objects waiting for their destination. Retried until the destination is back (at most " +
      backlog.max_age_hours + " h); an alert after " + backlog.alert_minutes + " min.";
  const body = fill("backlog", rows, "Nothing waiting: every destination is up to date.", 5);
  for (const d of rows) {
    body.append(el("tr", { "data-destination": d.destination, class: d.overdue ? "overdue" : "" },
      el("td", {}, d.destination), el("td", {}, d.pending),
      el("td", {}, d.overdue ? pill(String(d.overdue), "failed") : "0"),
      el("td", { title: d.oldest_pending_at || "" }, age(d.oldest_age_seconds)),
      el("td", { class: "err" }, d.last_error || "")));
  }
}

function renderFailed(failed, studies) {
  // the newest failed job of each study, unless the study has a newer job since
  // (older failures stay listed under Jobs)
  const latest = new Map(studies.items.map((s) => [s.study_instance_uid, s.latest_job_id]));
  const seen = new Set();
  const items = failed.items.filter((job) => {
    if (seen.has(job.study_instance_uid)) return false;
    seen.add(job.study_instance_uid);
    const newest = latest.get(job.study_instance_uid);
    return newest === undefined || newest === job.id;
  });
  const body = fill("failed", items, "No failed jobs.", 5);
  for (const job of items) {
    const button = el("button", { class: "primary", type: "button" }, "Reprocess");
    button.addEventListener("click", () => reprocess(job.study_instance_uid, button));
    body.append(el("tr", { "data-job": String(job.id) },
      el("td", {}, job.id), uidCell(job.study_instance_uid), el("td", {}, when(job.finished_at)),
      el("td", { class: "err" }, job.error || "–"), el("td", {}, button)));
  }
}

function patientCell(study) {
  // the patient handle: a pseudonym (the keyed patient hash's first digits), never an identifier
  if (!study.patient) return el("td", { class: "muted" }, "–");
  const button = el("button", { class: "patient" + (study.patient === selectedPatient ? " selected" : ""),
    type: "button", title: "this patient's nodule trend", "data-patient": study.patient },
    study.patient);
  button.addEventListener("click", (event) => {
    event.stopPropagation();  // not the row's study detail
    selectedPatient = selectedPatient === study.patient ? null : study.patient;
    refresh();
  });
  return el("td", {}, button);
}

function renderStudies(studies) {
  const body = fill("studies", studies.items, "No study received yet.", 8);
  for (const s of studies.items) {
    const row = el("tr", { class: "click" + (s.study_instance_uid === selectedStudy ? " selected" : ""),
      "data-study": s.study_instance_uid },
      uidCell(s.study_instance_uid),
      patientCell(s),
      el("td", {}, (s.modalities || []).join(", ") || "–"),
      el("td", {}, s.num_series + " / " + s.num_instances),
      el("td", {}, pill(s.status),
        s.pruned_at ? el("span", { class: "pill pruned", title: "files deleted by retention " +
          when(s.pruned_at) }, "pruned") : null),
      findingsCell(s),
      el("td", {}, deliverySummary(s.deliveries)),
      el("td", {}, when(s.received_at)));
    row.addEventListener("click", () => {
      selectedStudy = selectedStudy === s.study_instance_uid ? null : s.study_instance_uid;
      refresh();
    });
    body.append(row);
  }
}

function renderJobs(jobs) {
  const body = fill("jobs", jobs.items, "No job yet.", 8);
  for (const j of jobs.items) {
    body.append(el("tr", {},
      el("td", {}, j.id), uidCell(j.study_instance_uid), el("td", {}, pill(j.status)),
      el("td", {}, j.attempts), el("td", {}, seconds(j.created_at, j.started_at)),
      el("td", {}, seconds(j.started_at, j.finished_at)), el("td", {}, when(j.created_at)),
      el("td", { class: "err" }, j.error || "")));
  }
}

function renderModels(models) {
  const body = fill("models", models, "No model registered.", 5);
  for (const m of models) {
    body.append(el("tr", {},
      el("td", {}, m.name), el("td", {}, m.version || "–"), el("td", {}, m.task || "–"),
      el("td", {}, (m.findings || []).join(", ")),
      el("td", {}, m.enabled ? pill("enabled") : pill("disabled"),
        m.error ? el("div", { class: "err" }, m.error) : null)));
  }
}

function renderDeliveries(deliveries) {
  const body = fill("deliveries", deliveries.items, "No delivery yet.", 8);
  for (const d of deliveries.items) {
    let action = null;
    if (d.status === "failed") {
      action = el("button", { type: "button" }, "Resend study");
      action.addEventListener("click", () => resend(d.study_instance_uid, action));
    }
    body.append(el("tr", {},
      uidCell(d.study_instance_uid), el("td", {}, (d.kind || "").toUpperCase()),
      el("td", {}, d.destination), el("td", {}, pill(d.status)), el("td", {}, d.attempts),
      el("td", {}, when(d.sent_at)), el("td", { class: "err" }, d.last_error || ""),
      el("td", {}, action)));
  }
}

function measurementText(r) {
  const m = r.measurements || {};
  const parts = [];
  if (m.volume_ml !== undefined) parts.push(m.volume_ml + " ml");
  if (m.count !== undefined) parts.push(m.count + " found");
  if (m.largest_diameter_mm !== undefined) parts.push("largest " + m.largest_diameter_mm + " mm");
  return parts.join(", ") || "–";
}

async function renderDetail() {
  const box = document.getElementById("detail");
  if (!selectedStudy) { box.hidden = true; box.replaceChildren(); return; }
  const { status, body: s } = await api("/api/studies/" + encodeURIComponent(selectedStudy));
  if (status !== 200) { box.hidden = true; return; }
  const table = (head, rows) => el("table", {},
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty",
      colspan: String(head.length) }, "none"))])));
  const button = el("button", { class: "primary", type: "button" }, "Reprocess study");
  button.addEventListener("click", () => reprocess(s.study_instance_uid, button));
  let resendButton = null;
  if (s.deliveries.length) {
    resendButton = el("button", { type: "button" }, "Resend results");
    resendButton.addEventListener("click", () => resend(s.study_instance_uid, resendButton));
  }
  box.replaceChildren(
    el("h3", {}, "Study ", el("code", {}, s.study_instance_uid), " ", pill(s.status), " ", button,
      " ", resendButton),
    el("h3", {}, "Results"),
    table(["Model", "Version", "Series", "Finding", "Present", "Probability", "Measurements"],
      s.results.map((r) => el("tr", {},
        el("td", {}, r.model), el("td", {}, r.model_version), uidCell(r.series_instance_uid),
        el("td", {}, r.finding), el("td", {}, r.present === null ? "–" : (r.present ? "yes" : "no")),
        el("td", {}, r.probability === null ? "–" : (100 * r.probability).toFixed(1) + " %"),
        el("td", {}, measurementText(r))))),
    el("h3", {}, "Series"),
    table(["Series Instance UID", "Modality", "Number", "Description", "Instances"],
      s.series.map((x) => el("tr", {}, uidCell(x.series_instance_uid), el("td", {}, x.modality || "–"),
        el("td", {}, x.series_number ?? "–"), el("td", {}, x.series_description || ""),
        el("td", {}, x.num_instances)))),
    el("h3", {}, "Jobs"),
    table(["Job", "Status", "Attempts", "Waited", "Ran", "Error"],
      s.jobs.map((j) => el("tr", {}, el("td", {}, j.id), el("td", {}, pill(j.status)),
        el("td", {}, j.attempts), el("td", {}, seconds(j.created_at, j.started_at)),
        el("td", {}, seconds(j.started_at, j.finished_at)), el("td", { class: "err" }, j.error || "")))),
    el("h3", {}, "Deliveries"),
    table(["Object", "Destination", "Status", "Attempts", "Sent", "Last error"],
      s.deliveries.map((d) => el("tr", {}, el("td", {}, (d.kind || "").toUpperCase()),
        el("td", {}, d.destination), el("td", {}, pill(d.status)), el("td", {}, d.attempts),
        el("td", {}, when(d.sent_at)), el("td", { class: "err" }, d.last_error || "")))));
  box.hidden = false;
}

// -- patient trend ----------------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function number(value, digits, suffix) {
  if (value === null || value === undefined) return "–";
  return Number(value).toFixed(digits) + (suffix || "");
}

function trendChart(studies) {
  // volume_ml of each model and finding over the study dates: one polyline each
  const lines = new Map();
  for (const s of studies) {
    if (!s.study_date) continue;
    for (const f of s.findings) {
      if (f.volume_ml === null || f.volume_ml === undefined) continue;
      const key = f.model + " · " + f.finding;
      if (!lines.has(key)) lines.set(key, []);
      lines.get(key).push({ t: Date.parse(s.study_date), v: Number(f.volume_ml), date: s.study_date });
    }
  }
  const points = [...lines.values()].flat();
  if (!points.length) return el("p", { class: "muted" }, "No dated nodule volume to draw.");
  const W = 560, H = 200, L = 56, R = 16, T = 14, B = 34;
  const t0 = Math.min(...points.map((p) => p.t)), t1 = Math.max(...points.map((p) => p.t));
  const vMax = Math.max(...points.map((p) => p.v)) || 1;
  const x = (t) => (t1 === t0 ? L + (W - L - R) / 2 : L + (t - t0) / (t1 - t0) * (W - L - R));
  const y = (v) => T + (1 - v / vMax) * (H - T - B);
  const chart = svg("svg", { class: "trend-chart", viewBox: "0 0 " + W + " " + H, width: W,
    height: H, role: "img", "aria-label": "nodule volume (ml) over time" },
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("text", { class: "tick", x: L - 6, y: T + 4, "text-anchor": "end" }, number(vMax, 2)),
    svg("text", { class: "tick", x: L - 6, y: H - B, "text-anchor": "end" }, "0"),
    svg("text", { class: "tick", x: 4, y: T + (H - T - B) / 2, "text-anchor": "start" }, "ml"));
  const dates = [...new Set(points.map((p) => p.date))];
  for (const date of dates) {
    const at = x(Date.parse(date));  // the first and last labels stay inside the chart
    const anchor = dates.length < 2 ? "middle" : at <= L ? "start" : at >= W - R ? "end" : "middle";
    chart.append(svg("text", { class: "tick", x: at, y: H - B + 16, "text-anchor": anchor }, date));
  }
  let n = 0;
  for (const [key, pts] of lines) {
    pts.sort((a, b) => a.t - b.t);
    const cls = "series s" + (n++ % 4);
    chart.append(svg("polyline", { class: cls, fill: "none",
      points: pts.map((p) => x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ") }));
    for (const p of pts) {
      chart.append(svg("circle", { class: cls, cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 3.5 },
        svg("title", {}, key + ": " + p.date + ", " + number(p.v, 3, " ml"))));
    }
  }
  return chart;
}

async function renderTrend() {
  const box = document.getElementById("trend");
  if (!selectedPatient) { box.hidden = true; box.replaceChildren(); return; }
  let trend;
  try {
    const answer = await api("/api/patients/" + encodeURIComponent(selectedPatient) + "/trend");
    if (answer.status !== 200) throw new Error(answer.body.detail || "unavailable");
    trend = answer.body;
  } catch (err) {
    if (err instanceof Unauthorized) throw err;
    box.replaceChildren(el("h3", {}, "Patient trend"), el("p", { class: "error" }, err.message));
    box.hidden = false;
    return;
  }
  const rows = [];
  for (const s of trend.studies) {
    const findings = s.findings.length ? s.findings : [null];
    for (const f of findings) {
      rows.push(el("tr", { "data-study": s.study_instance_uid },
        el("td", {}, s.study_date || "undated"), uidCell(s.study_instance_uid),
        el("td", {}, f ? f.model : "–"), el("td", {}, f ? f.finding : "no nodule result"),
        el("td", {}, f ? number(f.volume_ml, 3) : "–"),
        el("td", {}, f ? number(f.change_percent, 1, " %") : "–"),
        el("td", {}, f ? number(f.doubling_time_days, 0) : "–")));
    }
  }
  const close = el("button", { type: "button" }, "Close");
  close.addEventListener("click", () => { selectedPatient = null; refresh(); });
  box.replaceChildren(
    el("h3", {}, "Patient trend ", el("code", {}, trend.patient), " ",
      el("span", { class: "muted" }, trend.studies.length + " studies, oldest first"), " ", close),
    trendChart(trend.studies),
    el("table", {},
      el("thead", {}, el("tr", {}, ...["Study date", "Study Instance UID", "Model", "Finding",
        "Volume (ml)", "Change", "VDT (days)"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
  box.hidden = false;
}

async function refresh() {
  try {
    const [ready, summary, studies, failed, jobs, models, deliveries, backlog] =
      await Promise.all([
        api("/readyz"), api("/api/summary"), api("/api/studies?limit=50"),
        api("/api/jobs?status=failed&limit=20"), api("/api/jobs?limit=30"), api("/api/models"),
        api("/api/deliveries?limit=20"), api("/api/deliveries/backlog"),
      ]);
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    document.getElementById("signout").hidden = !token();
    const readyPill = document.getElementById("ready");
    const ok = ready.status === 200;
    readyPill.className = "pill " + (ok ? "ready" : "not-ready");
    readyPill.textContent = ok ? "ready" : "not ready: " + Object.entries(ready.body.checks || {})
      .filter(([, v]) => v !== "ok").map(([k, v]) => k + " " + v).join(", ");
    renderStorage(ready.body.storage);
    renderTiles(summary.body, studies.body);
    renderBacklog(backlog.body);
    renderFailed(failed.body, studies.body);
    renderStudies(studies.body);
    renderJobs(jobs.body);
    renderModels(models.body);
    renderDeliveries(deliveries.body);
    await renderDetail();
    await renderTrend();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    if (err instanceof Unauthorized) return signIn();
    document.getElementById("updated").textContent = "update failed: " + err.message;
  }
}

function signIn(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent =
    message || (token() ? "That token was not accepted." : "");
  document.getElementById("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    document.getElementById("token").value = "";
    refresh();
  });
  document.getElementById("refresh").addEventListener("click", () => refresh());
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    signIn("Signed out.");
  });
  refresh();
  setInterval(() => { if (document.getElementById("login").hidden) refresh(); }, 10000);
});
