// keter dashboard: polls the JSON API every second and redraws; no build step, no framework.
// Every value from the API goes into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const token = document.querySelector('meta[name="keter-token"]').content;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")}h`;
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function when(epoch) {
  return new Date(epoch * 1000).toLocaleString([], { hour12: false });
}

function percent(ratio) {
  return `${(ratio * 100).toFixed(1)}%`;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state);
}

function setLive(ok) {
  const live = document.getElementById("live");
  live.textContent = ok ? "live" : "keter is not answering";
  live.className = ok ? "live ok" : "live down";
}

async function api(path, options = {}) {
  const response = await fetch(path, { cache: "no-store", ...options });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// Calls ``step`` every POLL_MS, one call at a time, for as long as the page is open.
function poll(step) {
  const run = async () => {
    try {
      await step();
      setLive(true);
    } catch (error) {
      setLive(false);
    }
    setTimeout(run, POLL_MS);
  };
  run();
}

function hostLinks(app) {
  const cell = el("td", { class: "hosts" });
  // Each URL by its host, read off the text keter writes (http://HOST[:PORT]/), once:
  // the URL parser throws on some names, and parsing every URL for every host took half
  // a second a refresh for an app of 500 hosts.
  const byHost = new Map(app.urls.map((url) => [url.split("/")[2].split(":")[0], url]));
  for (const host of app.hosts) {
    const url = byHost.get(host);
    cell.append(url ? el("a", { href: url, rel: "noreferrer" }, host) : el("span", {}, host), " ");
  }
  return cell;
}

function lastDeploy(last, now) {
  if (!last) return el("td", {}, "–");
  const cell = el("td", {}, badge(last.outcome), ` ${duration(now - last.at)} ago`);
  if (last.reason) cell.title = last.reason;
  return cell;
}

// -- certificates (keter.acme), on both pages -------------------------------------------

// 2026-11-30 05:44, local time: short enough for a table cell.
function date(epoch) {
  const d = new Date(epoch * 1000);
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}`;
}

function expires(notAfter, now) {
  if (notAfter === null) return "–";
  const left = notAfter - now;
  if (left <= 0) return `${date(notAfter)} (expired ${duration(-left)} ago)`;
  if (left < 86400) return `${date(notAfter)} (in ${duration(left)})`;
  const days = Math.floor(left / 86400);
  return `${date(notAfter)} (in ${days} day${days === 1 ? "" : "s"})`;
}

// "3m05s ago" or "in 56s", the date and time on hover; a next attempt already due is
// "due now" (keter.acme orders one host at a time).
function momentCell(name, epoch, now) {
  const cell = el("td", { class: name }, "–");
  if (epoch === null) return cell;
  cell.title = when(epoch);
  if (epoch > now) cell.textContent = `in ${duration(epoch - now)}`;
  else cell.textContent = name === "next" ? "due now" : `${duration(now - epoch)} ago`;
  return cell;
}

// The same block on both pages: built here, once, into their empty #certificates-block.
function certificatesTable() {
  const block = document.getElementById("certificates-block");
  if (!block.firstElementChild) {
    const heads = ["Host", "Issuer", "Expires", "Last attempt", "Outcome", "Next attempt", "Detail"];
    block.append(
      el("h2", {}, "Certificates ", el("span", { class: "muted" }, "from the ACME CA (ssl: acme)")),
      el("section", { class: "card" },
        el("table", { id: "certificates" },
          el("thead", {}, el("tr", {}, ...heads.map((head) => el("th", {}, head)))),
          el("tbody"))));
  }
  return block;
}

// Hidden while no host has a certificate state (no ssl: acme anywhere).
function drawCertificates(certificates, now) {
  const block = certificatesTable();
  const rows = certificates.map((cert) =>
    el("tr", { "data-host": cert.host },
      el("td", { class: "host" }, cert.host),
      el("td", { class: "issuer" }, cert.issuer || "–"),
      el("td", { class: "expires" }, expires(cert.not_after, now)),
      momentCell("attempt", cert.last_attempt, now),
      el("td", { class: "outcome" }, badge(cert.outcome)),
      momentCell("next", cert.next_attempt, now),
      el("td", { class: "detail reason" }, cert.detail)),
  );
  block.querySelector("tbody").replaceChildren(...rows);
  block.hidden = rows.length === 0;
}

// -- the list of apps -----------------------------------------------------------------

async function refreshList() {
  const [status, certificates] = await Promise.all([api("/api/status"), api("/api/certificates")]);
  drawCertificates(certificates.certificates, certificates.now);
  document.getElementById("root").textContent = status.keter.root;
  const rows = status.apps.map((app) =>
    el(
      "tr",
      { "data-app": app.name },
      el("td", {}, el("a", { href: `/app/${encodeURIComponent(app.name)}` }, app.name)),
      el("td", { class: "state" }, badge(app.state),
        app.deploying ? el("span", { class: "muted" }, ` → ${app.deploying}`) : null),
      el("td", { class: "mono" }, app.version || "–"),
      hostLinks(app),
      el("td", {}, app.uptime === null ? "–" : duration(app.uptime)),
      el("td", { class: "num" }, app.restarts),
      el("td", { class: "num rate" }, app.traffic ? app.traffic.rate.toFixed(1) : "–"),
      el("td", { class: "num errors" }, app.traffic ? percent(app.traffic.error_ratio) : "–"),
      lastDeploy(app.last_deploy, status.now),
    ),
  );
  document.querySelector("#apps tbody").replaceChildren(...rows);
  document.getElementById("empty").hidden = rows.length > 0;
  const events = status.events.slice(0, 30).map((event) =>
    el("li", {}, el("time", {}, clock(event.at)), el("span", { class: "app" }, event.app),
      el("span", {}, event.text)),
  );
  if (events.length === 0) events.push(el("li", { class: "empty" }, "Nothing has happened yet."));
  document.getElementById("events").replaceChildren(...events);
}

// -- one app ----------------------------------------------------------------------------

const appName = decodeURIComponent(location.pathname.replace(/^\/app\//, ""));

function fact(label, value) {
  return el("div", {}, el("dt", {}, label), el("dd", {}, value ?? "–"));
}

function showMessage(text, error = false) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = error ? "message error" : "message";
  message.hidden = false;
}

let archiveShown = "";

async function refreshApp() {
  const app = await api(`/api/apps/${encodeURIComponent(appName)}`);
  document.title = `${app.name} · keter`;
  document.getElementById("name").textContent = app.name;
  document.getElementById("state").replaceWith(Object.assign(badge(app.state), { id: "state" }));
  document.getElementById("facts").replaceChildren(
    fact("Version", app.version),
    fact("Bundle from", app.bundle_mtime ? when(app.bundle_mtime) : null),
    fact("Hosts", app.hosts ? app.hosts.join(", ") : null),
    fact("Port", app.port),
    fact("PID", app.pid),
    fact("Uptime", app.uptime == null ? null : duration(app.uptime)),
    fact("Restarts", app.restarts),
    fact("Database", app.database),
    fact("Deploying", app.deploying),
    fact("Last deploy", app.last_deploy ? `${app.last_deploy.outcome}, ${when(app.last_deploy.at)}` : null),
  );
  const history = app.history.map((entry) =>
    el("tr", {},
      el("td", {}, when(entry.at)),
      el("td", { class: "mono" }, entry.version),
      el("td", {}, badge(entry.outcome)),
      el("td", { class: "num" }, `${entry.duration.toFixed(1)}s`),
      el("td", { class: "reason" }, entry.reason)),
  );
  document.querySelector("#history tbody").replaceChildren(...history);
  drawCertificates(app.certificates || [], app.now);

  // Redrawn only when the archive changes, so an open menu is not reset every second.
  const older = app.archive.filter((bundle) => bundle.version !== app.version);
  const key = older.map((bundle) => bundle.version).join(",");
  if (key !== archiveShown) {
    archiveShown = key;
    document.getElementById("version").replaceChildren(
      ...older.map((bundle) => el("option", { value: bundle.version },
        `${bundle.version} (served ${when(bundle.served_at)})`)),
    );
  }
  // Nothing to go back to: no menu, and the button says why.
  document.getElementById("version").hidden = older.length === 0;
  const rollback = document.getElementById("rollback");
  rollback.disabled = older.length === 0;
  rollback.title = older.length === 0 ? "no earlier version is archived" : "";
  document.getElementById("restart").disabled = app.state === "removed";
  return app;
}

// -- the last hour of traffic: requests and 5xx per minute (bars), p99 (line), deploys (marks)

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 960, height: 180, left: 8, right: 8, top: 14, bottom: 22 };

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child);
  return node;
}

function drawTraffic(stats, history) {
  const minutes = stats.minutes;
  const chart = document.getElementById("traffic");
  if (!minutes.length) return;
  const first = minutes[0].at;
  const span = minutes.length * 60;
  const inner = CHART.width - CHART.left - CHART.right;
  const low = CHART.height - CHART.bottom;
  const high = low - CHART.top;
  const x = (t) => CHART.left + ((t - first) / span) * inner;
  const slot = inner / minutes.length;
  const maxRequests = Math.max(1, ...minutes.map((m) => m.requests));
  const p99s = minutes.filter((m) => m.p99 !== null).map((m) => m.p99);
  const maxP99 = Math.max(0.001, ...p99s);
  const parts = [svg("line", { class: "axis", x1: CHART.left, x2: CHART.width - CHART.right, y1: low, y2: low })];
  const points = [];
  minutes.forEach((m, i) => {
    const left = CHART.left + i * slot + 1;
    const height = (m.requests / maxRequests) * high;
    const group = svg("g", { class: "minute", "data-at": m.at, "data-requests": m.requests, "data-errors": m.errors },
      svg("title", {}, `${clock(m.at)}: ${m.requests} requests, ${m.errors} 5xx` +
        (m.p99 === null ? "" : `, p99 ${(m.p99 * 1000).toFixed(1)} ms`)));
    group.append(svg("rect", { class: "bar", x: left, y: low - height, width: slot - 2, height }));
    if (m.errors) {
      const errors = (m.errors / maxRequests) * high;
      group.append(svg("rect", { class: "bar errors", x: left, y: low - errors, width: slot - 2, height: errors }));
    }
    parts.push(group);
    if (m.p99 !== null) points.push(`${left + slot / 2 - 1},${low - (m.p99 / maxP99) * high}`);
  });
  if (points.length) parts.push(svg("polyline", { class: "p99", points: points.join(" ") }));
  // Every deploy verdict within the hour, at the minute it came.
  for (const entry of history) {
    if (entry.at < first || entry.at > first + span) continue;
    const at = x(entry.at);
    parts.push(svg("g", { class: `mark ${entry.outcome}`, "data-version": entry.version },
      svg("title", {}, `${when(entry.at)}: version ${entry.version} ${entry.outcome}`),
      svg("line", { x1: at, x2: at, y1: CHART.top - 6, y2: low }),
      svg("text", { x: at + 3, y: CHART.top }, entry.version.slice(0, 7))));
  }
  parts.push(svg("text", { class: "label", x: CHART.left, y: CHART.height - 6 }, clock(first)));
  parts.push(svg("text", { class: "label end", x: CHART.width - CHART.right, y: CHART.height - 6 }, "now"));
  chart.replaceChildren(...parts);
  const lastHour = stats.windows[stats.windows.length - 1];
  document.getElementById("traffic-legend").textContent =
    `${lastHour.requests} requests, ${percent(lastHour.error_ratio)} 5xx; ` +
    `bars: requests per minute (max ${maxRequests}), red: 5xx, line: p99 (max ${(maxP99 * 1000).toFixed(1)} ms)`;
}

async function refreshTraffic(history) {
  try {
    drawTraffic(await api(`/api/apps/${encodeURIComponent(appName)}/stats`), history);
  } catch (error) {
    document.getElementById("traffic-legend").textContent = error.message;
  }
}

async function refreshLog() {
  const log = await api(`/api/apps/${encodeURIComponent(appName)}/log?n=200`);
  const pre = document.getElementById("log");
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  const text = log.lines.join("\n");
  if (pre.textContent !== text) {
    pre.textContent = text;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
  document.getElementById("logfile").textContent = log.file;
}

async function post(action, body) {
  const buttons = document.querySelectorAll(".actions button");
  buttons.forEach((button) => { button.disabled = true; });
  try {
    const result = await api(`/api/apps/${encodeURIComponent(appName)}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Keter-Token": token },
      body: JSON.stringify(body),
    });
    showMessage(action === "restart"
      ? `Restarting version ${result.version}; the new process takes over once it answers.`
      : `Rolling back to version ${result.version}.`);
  } catch (error) {
    showMessage(`${action} failed: ${error.message}`, true);
  } finally {
    buttons.forEach((button) => { button.disabled = false; });
  }
}

// -- settings (keter env): names only; a value goes in, never out ---------------------------

let settingsShown = null;

async function refreshSettings() {
  const settings = await api(`/api/apps/${encodeURIComponent(appName)}/env`);
  const key = settings.names.join(",");
  if (key === settingsShown) return;
  settingsShown = key;
  const items = settings.names.map((name) => {
    const unset = el("button", { type: "button", "data-name": name }, "Unset");
    unset.addEventListener("click", () => changeSettings({ unset: [name] }, `Unset ${name}`));
    return el("li", {}, el("span", { class: "mono" }, name), unset);
  });
  if (items.length === 0) items.push(el("li", { class: "empty" }, "No settings."));
  document.getElementById("settings").replaceChildren(...items);
}

async function changeSettings(body, done) {
  const buttons = document.querySelectorAll(".settings button");
  buttons.forEach((button) => { button.disabled = true; });
  try {
    const result = await api(`/api/apps/${encodeURIComponent(appName)}/env`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Keter-Token": token },
      body: JSON.stringify({ ...body, restart: true }),
    });
    showMessage(result.restart
      ? `${done}; restarting version ${result.restart.version} with it.`
      : `${done}; the next deploy applies it.`);
    document.getElementById("setting-value").value = "";
    settingsShown = null;
    await refreshSettings();
  } catch (error) {
    showMessage(`settings: ${error.message}`, true);
  } finally {
    buttons.forEach((button) => { button.disabled = false; });
  }
}

if (document.body.dataset.page === "app") {
  document.getElementById("setting-set").addEventListener("click", () => {
    const name = document.getElementById("setting-name").value.trim();
    const value = document.getElementById("setting-value").value;
    changeSettings({ set: { [name]: value } }, `Set ${name}`);
  });
  document.getElementById("restart").addEventListener("click", () => post("restart", {}));
  document.getElementById("rollback").addEventListener("click", () =>
    post("rollback", { version: document.getElementById("version").value }));
  poll(async () => {
    const [app] = await Promise.all([refreshApp(), refreshLog(), refreshSettings()]);
    await refreshTraffic(app.history);
  });
} else {
  poll(refreshList);
}
