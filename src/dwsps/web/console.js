// The dwsps web console: connect, subscribe, watch, publish, and the server's /health.
//
// Deliveries can arrive by the thousand per second, so nothing touches the DOM per delivery:
// each one is counted and queued, and one requestAnimationFrame callback renders what is new
// (at most LOG_CAP rows; older rows are dropped off the end, so the page stays small).
//
// At 5,000 deliveries a second the receiving alone (a task, JSON.parse and the handler per
// message) keeps the main thread half busy on a loaded 2-core machine, so rendering gets
// what is left and must stay small: a frame adds at most ROWS_PER_FRAME rows; under heavy
// traffic the rows to add are chosen only every LOG_INTERVAL ms, as the newest LOG_CAP of
// what arrived meanwhile (older ones would be evicted at once anyway); the counters change at
// most every COUNTER_INTERVAL ms. console.css keeps the log's layout to itself (contain) and
// skips rows out of view (content-visibility), and drawing the chart reads no layout.
import { Client } from "../dwsps.js";

const LOG_CAP = 500;
const ROWS_PER_FRAME = 100;
/** Up to ROWS_PER_FRAME / 2 new deliveries are shown at the next frame; more wait this long. */
const LOG_INTERVAL = 500;
/** The counters change at most this often (each change is a style, layout and paint). */
const COUNTER_INTERVAL = 100;
const CHART_SECONDS = 60;

const $ = (id) => document.getElementById(id);

const state = {
  client: null,
  url: "",
  subs: new Map(), // topic -> { li, count, countEl }
  pending: [], // deliveries not chosen for the log yet (the newest LOG_CAP at most matter)
  paused: false,
  unseen: 0, // arrived while paused
  filter: "",
  total: 0,
  thisSecond: 0,
  here: new Array(CHART_SECONDS).fill(0),
  server: new Array(CHART_SECONDS).fill(0),
  serverRate: 0,
  lastHealth: null, // { at, deliveries }
  renderQueued: false,
  inserting: [], // chosen for the log, oldest first, added ROWS_PER_FRAME a frame
  logChosenAt: 0, // performance.now() when `inserting` was last chosen
  countersAt: 0, // performance.now() when the counters were last shown
  colors: null, // the chart's CSS colours, read once per colour scheme
};

// -- connecting --------------------------------------------------------------

function defaultUrl() {
  if (location.protocol !== "http:" && location.protocol !== "https:") return "ws://localhost:8000";
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
}

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function connect() {
  disconnect();
  const url = $("url").value.trim();
  const token = $("token").value.trim() || undefined;
  let client;
  try {
    client = new Client(url, { token, backoffMax: 5000 });
  } catch (err) {
    setStatus("closed", `cannot connect: ${err.message}`);
    return;
  }
  state.client = client;
  state.url = url;
  state.lastHealth = null;
  setStatus("connecting", `connecting to ${url}…`);
  $("disconnect").disabled = false;
  client.on("open", () => setStatus("open", `connected to ${url}`));
  client.on("disconnect", () => setStatus("reconnecting", "connection lost, reconnecting…"));
  client.on("reconnect", () => setStatus("open", `connected to ${url} (reconnected)`));
  client.on("close", (code, reason) => {
    if (state.client === client) setStatus("closed", `closed (${code}${reason ? `: ${reason}` : ""})`);
  });
  client.on("message", received);
  // The list outlives a connection: what it shows is subscribed on the new one.
  for (const topic of state.subs.keys()) subscribe(topic);
  pollHealth();
}

function disconnect() {
  const client = state.client;
  if (!client) return;
  state.client = null;
  client.close();
  setStatus("closed", "disconnected");
  $("disconnect").disabled = true;
}

// -- subscriptions -------------------------------------------------------------

function subscribe(topic) {
  const client = state.client;
  let entry = state.subs.get(topic);
  if (!entry) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "topic";
    name.textContent = topic;
    const countEl = document.createElement("span");
    countEl.className = "count";
    countEl.textContent = "0";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `Unsubscribe from ${topic}`;
    remove.setAttribute("aria-label", `Unsubscribe from ${topic}`);
    remove.addEventListener("click", () => unsubscribe(topic));
    li.append(name, countEl, remove);
    $("subs").append(li);
    entry = { li, count: 0, countEl };
    state.subs.set(topic, entry);
  }
  entry.li.dataset.state = "pending";
  if (!client) return;
  client.subscribe(topic).then(
    () => {
      entry.li.dataset.state = "held";
      result("sub-result", "ok", `subscribed to ${topic}`);
    },
    (err) => {
      if (err.code === "closed") return;
      if (state.subs.get(topic) === entry) {
        entry.li.remove();
        state.subs.delete(topic);
      }
      result("sub-result", "bad", `${topic}: ${err.message}`);
    },
  );
}

function unsubscribe(topic) {
  const entry = state.subs.get(topic);
  if (!entry) return;
  entry.li.remove();
  state.subs.delete(topic);
  state.client?.unsubscribe(topic).then(
    () => result("sub-result", "ok", `unsubscribed from ${topic}`),
    (err) => err.code === "closed" || result("sub-result", "bad", `${topic}: ${err.message}`),
  );
  $("sub-topic").focus();
}

function result(id, kind, text) {
  const el = $(id);
  el.className = `result ${kind}`;
  el.textContent = text;
}

// -- publishing ----------------------------------------------------------------

/** The message in the editor as a value, or undefined (and the reason shown) when invalid. */
function messageValue() {
  const area = $("pub-message");
  const text = area.value.trim();
  let value;
  let problem = "";
  if (text === "") {
    value = null;
  } else {
    try {
      value = JSON.parse(text);
    } catch (err) {
      problem = `not JSON: ${err.message}`;
    }
  }
  $("json-error").textContent = problem;
  area.setAttribute("aria-invalid", problem ? "true" : "false");
  $("publish").disabled = Boolean(problem);
  return problem ? undefined : value;
}

function publish() {
  const topic = $("pub-topic").value.trim();
  const message = messageValue();
  if (message === undefined || !topic) return;
  if (!state.client) {
    result("pub-result", "bad", "not connected");
    return;
  }
  result("pub-result", "", `publishing to ${topic}…`);
  state.client.publish(topic, message).then(
    (ack) => result("pub-result", "ok", `ack: ${ack.action} ${ack.topic} · id ${ack.id} · ${ack.timestamp}`),
    (err) => result("pub-result", "bad", `${err.code}: ${err.message}`),
  );
}

// -- the log ---------------------------------------------------------------------

function received(delivery) {
  state.total += 1;
  state.thisSecond += 1;
  const entry = state.subs.get(delivery.context);
  if (entry) entry.count += 1;
  state.pending.push(delivery);
  if (state.pending.length > 2 * LOG_CAP) state.pending.splice(0, state.pending.length - LOG_CAP);
  if (state.paused) state.unseen += 1;
  queueRender();
}

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(render);
}

function render(now = performance.now(), force = false) {
  state.renderQueued = false;
  if (!state.paused) {
    const due = state.pending.length <= ROWS_PER_FRAME / 2 || now - state.logChosenAt >= LOG_INTERVAL;
    if (!state.inserting.length && state.pending.length && due) {
      state.logChosenAt = now;
      state.inserting = state.pending.slice(-LOG_CAP); // older ones would only be evicted
      state.pending = [];
    }
    if (state.inserting.length) insertRows(state.inserting.splice(0, ROWS_PER_FRAME));
    if (state.inserting.length || state.pending.length) queueRender();
  }
  if (force || now - state.countersAt >= COUNTER_INTERVAL) {
    state.countersAt = now;
    for (const entry of state.subs.values()) entry.countEl.textContent = entry.count.toLocaleString();
    $("log-count").textContent = `${state.total.toLocaleString()} messages`;
    $("pause").textContent = state.paused ? `Resume (${state.unseen.toLocaleString()} new)` : "Pause";
  } else {
    queueRender();
  }
}

/** Put `batch` (oldest first) on top of the log, newest first, and keep the newest LOG_CAP. */
function insertRows(batch) {
  const log = $("log");
  const fragment = document.createDocumentFragment();
  for (let i = batch.length - 1; i >= 0; i -= 1) fragment.append(row(batch[i]));
  log.prepend(fragment);
  while (log.childElementCount > LOG_CAP) log.lastElementChild.remove();
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

function row(d) {
  const li = document.createElement("li");
  const when = new Date(d.timestamp);
  const time = document.createElement("time");
  time.dateTime = d.timestamp ?? "";
  time.textContent = Number.isNaN(when.getTime())
    ? String(d.timestamp ?? "")
    : `${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}.${pad(when.getMilliseconds(), 3)}`;
  const topic = document.createElement("span");
  topic.className = d.fromPeerServer ? "topic peer" : "topic";
  topic.textContent = d.topic;
  if (d.fromPeerServer) topic.title = "came through a peer server";
  const context = document.createElement("span");
  context.className = "context";
  context.textContent = d.context;
  context.title = `subscription ${d.context}`;
  const body = document.createElement("pre");
  const message = d.message ?? null;
  // One line per row, so a screenful shows many; objects expand to the pretty form on demand.
  body.textContent = oneLine(message);
  if (message !== null && typeof message === "object" && Object.keys(message).length) {
    body.tabIndex = 0;
    body.setAttribute("role", "button");
    body.setAttribute("aria-expanded", "false");
    body.title = "Click or Enter: expand";
  }
  li.append(time, topic, context, body);
  li.dataset.text = `${d.topic} ${d.context} ${body.textContent}`.toLowerCase();
  li.hidden = !matches(li);
  return li;
}

/** JSON on one line, spaced for reading: {"a": 1, "b": [1, 2]}. A string's own line breaks
 * are escaped in JSON, so every raw newline here is layout. */
function oneLine(value) {
  return JSON.stringify(value, null, 1)
    .replace(/([{[])\n */g, "$1")
    .replace(/\n *([}\]])/g, "$1")
    .replace(/\n */g, " ");
}

/** Toggle a log row's message between the one-line and the pretty-printed JSON. */
function toggleExpanded(body) {
  const expand = body.getAttribute("aria-expanded") === "false";
  const value = JSON.parse(body.textContent);
  body.textContent = expand ? JSON.stringify(value, null, 2) : oneLine(value);
  body.setAttribute("aria-expanded", String(expand));
  body.title = expand ? "Click or Enter: collapse" : "Click or Enter: expand";
}

function expandable(target) {
  return target instanceof HTMLElement && target.matches("#log pre[aria-expanded]") ? target : null;
}

function matches(li) {
  return !state.filter || li.dataset.text.includes(state.filter);
}

function applyFilter() {
  state.filter = $("filter").value.trim().toLowerCase();
  for (const li of $("log").children) li.hidden = !matches(li);
}

function togglePause() {
  state.paused = !state.paused;
  state.unseen = 0;
  $("pause").setAttribute("aria-pressed", String(state.paused));
  render(performance.now(), true);
}

// -- /health and the chart -------------------------------------------------------

function healthUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = "/health";
  u.search = "";
  return u.toString();
}

let healthBusy = false;

async function pollHealth() {
  const client = state.client;
  // Only while connected: a server that is down would fill the browser's console with errors.
  if (!client?.connected || healthBusy) return;
  healthBusy = true;
  try {
    const response = await fetch(healthUrl(state.url), { cache: "no-store" });
    showHealth(await response.json());
    $("health-error").textContent = "";
  } catch (err) {
    $("health-status").textContent = "unreachable";
    $("health-status").dataset.state = "unreachable";
    $("health-error").textContent = `/health: ${err.message}`;
  } finally {
    healthBusy = false;
  }
}

function showHealth(h) {
  const status = $("health-status");
  status.textContent = h.status;
  status.dataset.state = h.status;
  const stats = h.stats ?? {};
  $("health-connections").textContent = fmt(h.connections);
  $("health-subscriptions").textContent = fmt(h.subscriptions);
  $("health-publishes").textContent = fmt(stats.publishes);
  $("health-deliveries").textContent = fmt(stats.deliveries);
  const now = performance.now();
  if (state.lastHealth && typeof stats.deliveries === "number") {
    const seconds = (now - state.lastHealth.at) / 1000;
    state.serverRate = Math.max(0, (stats.deliveries - state.lastHealth.deliveries) / seconds);
  }
  state.lastHealth = { at: now, deliveries: stats.deliveries ?? 0 };

  const peers = $("peers");
  peers.replaceChildren();
  for (const peer of h.peers ?? []) {
    const li = document.createElement("li");
    const url = document.createElement("span");
    url.textContent = peer.url;
    const link = document.createElement("span");
    link.textContent = peer.state;
    link.className = `state-${peer.state === "up" || peer.state === "connected" ? "up" : "down"}`;
    li.append(url, link);
    peers.append(li);
  }
  if (!peers.childElementCount) peers.innerHTML = '<li class="none">none</li>';

  const bp = h.backplane;
  const backplane = $("backplane");
  backplane.replaceChildren();
  if (!bp) {
    backplane.textContent = "none (this server alone)";
  } else {
    const url = document.createElement("span");
    url.textContent = `${bp.url ?? "?"} `;
    const link = document.createElement("span");
    link.textContent = bp.state ?? (bp.healthy ? "up" : "down");
    link.className = bp.healthy ? "state-up" : "state-down";
    backplane.append(url, link);
  }
}

const fmt = (n) => (typeof n === "number" ? n.toLocaleString() : "–");

function tick() {
  state.here.push(state.thisSecond);
  state.here.shift();
  state.server.push(state.serverRate);
  state.server.shift();
  $("rate-here").textContent = state.thisSecond.toLocaleString();
  $("rate-server").textContent = Math.round(state.serverRate).toLocaleString();
  state.thisSecond = 0;
  drawChart();
  pollHealth();
}

function niceMax(value) {
  if (value <= 10) return 10;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

let chartSize = { width: 0, height: 0 };

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  // The size from the ResizeObserver: reading clientWidth would force a layout every second.
  const { width, height } = chartSize;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  // Reading CSS forces a style pass over the whole page: once per colour scheme, not per draw.
  if (!state.colors) {
    const css = getComputedStyle(document.documentElement);
    state.colors = Object.fromEntries(
      ["--line", "--muted", "--here", "--server"].map((n) => [n, css.getPropertyValue(n).trim()]),
    );
  }
  const color = (name) => state.colors[name];
  const peakHere = Math.max(...state.here);
  const peakServer = Math.round(Math.max(...state.server));
  // What the picture shows, for screen readers (and the tests).
  canvas.setAttribute(
    "aria-label",
    `Deliveries per second, last ${CHART_SECONDS} s: peak ${peakHere} received here, ` +
      `peak ${peakServer} on the whole server`,
  );
  const top = niceMax(Math.max(peakHere, peakServer));
  const left = 44;
  const pad = 8;
  const plotW = width - left - pad;
  const plotH = height - 2 * pad;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const y = pad + (plotH * i) / 4;
    ctx.strokeStyle = color("--line");
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y) + 0.5);
    ctx.lineTo(width - pad, Math.round(y) + 0.5);
    ctx.stroke();
    ctx.fillStyle = color("--muted");
    ctx.fillText(Math.round(top * (1 - i / 4)).toLocaleString(), left - 6, y);
  }
  const line = (series, name) => {
    ctx.strokeStyle = color(name);
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach((v, i) => {
      const x = left + (plotW * i) / (CHART_SECONDS - 1);
      const y = pad + plotH * (1 - v / top);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  };
  line(state.server, "--server");
  line(state.here, "--here");
}

// -- wiring ------------------------------------------------------------------------

function isTyping(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement;
}

function start() {
  $("url").value = defaultUrl();
  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", disconnect);
  $("subscribe-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("sub-topic");
    const topic = input.value.trim();
    if (!topic) return;
    if (!state.client) {
      result("sub-result", "bad", "not connected");
      return;
    }
    subscribe(topic);
    input.value = "";
  });
  $("publish-form").addEventListener("submit", (e) => {
    e.preventDefault();
    publish();
  });
  $("pub-message").addEventListener("input", messageValue);
  $("pub-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      publish();
    }
  });
  $("filter").addEventListener("input", applyFilter);
  $("filter").addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.target.value = "";
      applyFilter();
    }
  });
  // One listener for every row (rows come and go by the thousand).
  $("log").addEventListener("click", (e) => {
    const body = expandable(e.target);
    // A click that ends a text selection is for copying, not toggling.
    if (body && !window.getSelection()?.toString()) toggleExpanded(body);
  });
  $("log").addEventListener("keydown", (e) => {
    const body = expandable(e.target);
    if (body && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      toggleExpanded(body);
    }
  });
  $("pause").addEventListener("click", togglePause);
  $("clear").addEventListener("click", () => {
    state.pending = [];
    state.inserting = [];
    state.unseen = 0;
    $("log").replaceChildren();
    render(performance.now(), true);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && !isTyping(e.target) && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      $("filter").focus();
    }
  });
  new ResizeObserver(([entry]) => {
    chartSize = { width: entry.contentRect.width, height: entry.contentRect.height };
    drawChart();
  }).observe($("chart"));
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    state.colors = null;
    drawChart();
  });
  setInterval(tick, 1000);
  messageValue();
  drawChart();
  // Opened from a server, the console watches that server straight away.
  if (location.protocol === "http:" || location.protocol === "https:") connect();
}

start();
