// dwsps.js — the dwsps client for browsers and Node.js >= 20: one ES module, no dependencies.
//
//   import { Client } from "http://localhost:8000/dwsps.js";
//   const client = new Client("ws://localhost:8000", { token });
//   await client.subscribe("news", (delivery) => console.log(delivery.topic, delivery.message));
//   await client.publish("news.uk", { headline: "hello" });
//
// Wire protocol: PROTOCOL.md (served by `dwsps serve` as GET /dwsps.js; the npm package
// in clients/js/ is the same file).
//
// Requests carry an integer `id` that the server echoes in its ack or error; a reply without
// one (the original Node.js server) is matched to the oldest request in flight with the same
// action and topic, which is exact because replies come in request order.
//
// Reconnection: exponential backoff with full jitter (a uniformly random delay in
// [0, min(backoffMax, backoffInitial * 2^n)], the same formula as the Python client), then
// every held subscription is subscribed again (one function, #resubscribe) and `reconnect` is
// emitted. Requests made while disconnected wait for the connection, each within its own
// timeout, and at most `maxQueued` of them (beyond that they reject with `queue_full`). An
// in-flight subscribe/unsubscribe/auth is sent again after a reconnect (they are idempotent);
// an in-flight publish rejects with `connection_lost`, since it may have been delivered.
// Close codes that retrying cannot cure (1002, 1003, 1007, 1008: authentication or a broken
// rule) end the client for good, as does close().
//
// Tokens: `tokenProvider` (a function returning a token or a Promise of one) renews them:
// it is asked for the first token when none is given, shortly before each token's `exp`
// (read from the JWT, unverified; 30 s ahead, or a fifth of the remaining life) with the
// result sent by refreshToken(), and again before reconnecting after 1008 `token expired` /
// `unauthorized` (which then do not end the client) or after an attempt that never opened
// while the token was due (a browser cannot see the 401 itself).
//
// Recovery (PROTOCOL.md, "History and recovery"): a subscription that lies inside one history
// stream is acked with its `stream`, `epoch` and `offset`; the client remembers them and moves
// them on with every delivery of that stream. On reconnect it resubscribes with
// `recover: {epoch, offset}`, so the server replays what was published meanwhile before live
// deliveries resume; once the replay is in (the ack's `replay` counts it), the position moves to
// the ack's offset, so a subscription narrower than its stream does not fall behind it.
// `recovery(topic, recovered, reply)` is emitted from the ack, before any replayed delivery;
// `recovered: false` means messages were lost (new epoch, or the history no longer reaches back)
// and the position starts afresh from the ack's.

/** Close codes that reconnecting cannot cure: the client stops and emits `close`. */
const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008]);

/** 1008 reasons a fresh token cures: with a `tokenProvider` the client reconnects. */
const TOKEN_CLOSE_REASONS = new Set(["token expired", "unauthorized"]);

/** Milliseconds before `exp` a provider's token is renewed (at most a fifth of what is left). */
const REFRESH_AHEAD = 30000;

const EVENTS = [
  "open",
  "message",
  "ack",
  "error",
  "disconnect",
  "reconnect",
  "recovery",
  "close",
];

const DEFAULTS = {
  timeout: 10000,
  backoffInitial: 100,
  backoffMax: 10000,
  maxQueued: 1024,
  reconnect: true,
};

/** A failed request: `code` is the server's error code or one of the client's own. */
export class DwspsError extends Error {
  /**
   * @param {string} code e.g. "invalid_topic", "forbidden", "timeout", "connection_lost"
   * @param {string} message
   * @param {object} [reply] the server's error reply, when there was one
   */
  constructor(code, message, reply) {
    super(message);
    this.name = "DwspsError";
    this.code = code;
    this.reply = reply;
  }
}

/** Take the `stream`/`epoch`/`offset` of an ack into `entry` (none: not recoverable). */
function takePosition(entry, reply) {
  const { stream, epoch, offset } = reply;
  const ok = typeof stream === "string" && typeof epoch === "string" && Number.isInteger(offset);
  entry.stream = ok ? stream : null;
  entry.epoch = ok ? epoch : null;
  entry.offset = ok ? offset : null;
  entry.seam = null;
}

/**
 * After a `recovered: true` ack: move to its offset once its `replay` deliveries are in. A
 * subscription narrower than its stream gets nothing for its siblings' offsets; without this its
 * position would lag until the history no longer reached back to it. Nothing at or below the
 * ack's offset comes after the replay (the seam), so the ack's offset is then the position.
 */
function expectReplay(entry, reply) {
  const { replay, epoch, offset } = reply;
  entry.seam = null;
  if (Number.isInteger(replay) && Number.isInteger(offset) && epoch === entry.epoch) {
    entry.seam = { left: replay, head: offset };
    if (replay <= 0) passSeam(entry);
  }
}

/** Take a delivery's position (`replayed`: it carries `recovered: true`). */
function advance(entry, epoch, offset, replayed) {
  let seam = entry.seam;
  if (seam && (epoch !== entry.epoch || offset >= seam.head)) seam = entry.seam = null;
  entry.epoch = epoch;
  entry.offset = offset;
  if (seam && replayed) {
    seam.left -= 1;
    if (seam.left <= 0) passSeam(entry);
  }
}

function passSeam(entry) {
  if (entry.offset !== null && entry.offset < entry.seam.head) entry.offset = entry.seam.head;
  entry.seam = null;
}

/** A JWT's `exp` in milliseconds, read without verifying (the server verifies), or null. */
function expiryOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")))?.exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** The WebSocket URL with `?token=` set (browsers cannot send an Authorization header). */
function withToken(url, token) {
  if (!token) return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

export class Client {
  #url;
  #options;
  #WebSocket;
  #token;
  #tokenStale = false;
  #refreshTimer = null;
  #ws = null;
  /** whether #ws ever opened (an attempt that did not may have been a 401) */
  #wsOpened = false;
  #connected = false;
  #closed = false;
  #everOpened = false;
  #attempt = 0;
  #retryTimer = null;
  #nextId = 1;
  /** id -> request state, in send order (Map keeps insertion order). */
  #pending = new Map();
  /** requests waiting for a connection, in call order */
  #queue = [];
  /** topic -> { handler, acked, stream, epoch, offset, recovered } */
  #subscriptions = new Map();
  #listeners = new Map(EVENTS.map((e) => [e, new Set()]));

  /**
   * Connects at once (and again after every drop, until close()).
   * @param {string} url ws:// or wss:// URL of a dwsps server
   * @param {object} [options] token, tokenProvider, WebSocket, timeout, backoffInitial,
   *   backoffMax, maxQueued, reconnect (see dwsps.d.ts)
   */
  constructor(url, options = {}) {
    const parsed = new URL(url); // a TypeError for a malformed URL, at once
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`a dwsps URL starts with ws:// or wss://, not ${parsed.protocol}//`);
    }
    this.#url = url;
    this.#options = { ...DEFAULTS, ...options };
    this.#token = options.token;
    this.#tokenStale = !this.#token && typeof options.tokenProvider === "function";
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket here: pass one in the options, e.g. new Client(url, { WebSocket })",
      );
    }
    this.#connect();
  }

  /** Whether the connection is open right now. */
  get connected() {
    return this.#connected;
  }

  /** The topics this client holds (subscribed, or being subscribed). */
  get subscriptions() {
    return [...this.#subscriptions.keys()];
  }

  /** Listen for an event; returns this. */
  on(event, listener) {
    this.#listenersOf(event).add(listener);
    return this;
  }

  /** Stop listening; returns this. */
  off(event, listener) {
    this.#listenersOf(event).delete(listener);
    return this;
  }

  /**
   * The held subscription `topic`: its history position and `recovered` flag (true or false
   * after a reconnect that recovered it or lost messages; null before one, or without history).
   */
  subscription(topic) {
    const entry = this.#subscriptions.get(topic);
    if (!entry) return undefined;
    const { stream, epoch, offset, recovered } = entry;
    return { topic, stream, epoch, offset, recovered };
  }

  /**
   * Subscribe to `topic`; `handler` gets each delivery whose context is this subscription.
   * Resolves with the ack, rejects with a DwspsError.
   */
  subscribe(topic, handler) {
    const previous = this.#subscriptions.get(topic);
    const entry = {
      handler: handler ?? previous?.handler,
      acked: previous?.acked ?? false,
      stream: null,
      epoch: null,
      offset: null,
      recovered: null,
      seam: null,
    };
    this.#subscriptions.set(topic, entry);
    const done = this.#request({ type: "subscribe", topic }, (reply) => takePosition(entry, reply));
    done.then(
      () => {
        entry.acked = true;
      },
      () => {
        if (this.#subscriptions.get(topic) === entry && !entry.acked) {
          this.#subscriptions.delete(topic);
        }
      },
    );
    return done;
  }

  /** Remove exactly the subscription `topic` (its handler stops at once). */
  unsubscribe(topic) {
    this.#subscriptions.delete(topic);
    return this.#request({ type: "unsubscribe", topic });
  }

  /** Publish `message` (any JSON value) to `topic`; resolves with the ack. */
  publish(topic, message = null) {
    return this.#request({ type: "publish", topic, message });
  }

  /**
   * The latest kept publications of `topic` (at most `limit`, oldest first): resolves with the
   * server's `history` reply (`epoch`, `offset`, `publications`); with `since: {epoch, offset}`
   * only those after it. Rejects with `invalid_message` when no history is kept for `topic`.
   */
  history(topic, { limit = 100, since } = {}) {
    const fields = { type: "history", topic, limit };
    if (since) fields.since = { epoch: since.epoch, offset: since.offset };
    return this.#request(fields);
  }

  /**
   * Replace the connection's token (an `auth` request) before the old one expires; later
   * reconnects use the new token too. Resolves with the ack; a bad token rejects with
   * `unauthorized` and the server closes the connection (1008), which ends the client.
   */
  refreshToken(token) {
    this.#token = token;
    return this.#request({ type: "auth", token }).then((ack) => {
      this.#scheduleRefresh();
      return ack;
    });
  }

  /** Close for good: pending requests reject with `closed`, `close` is emitted once. */
  close(code = 1000, reason = "") {
    if (this.#closed) return;
    this.#finish(code, reason);
    const ws = this.#ws;
    if (ws && ws.readyState <= 1) ws.close(code, reason);
  }

  // -- requests ------------------------------------------------------------

  /** `onAck(reply)` runs as the reply is read, before any frame that follows it. */
  #request(fields, onAck = null, resubscribe = false) {
    if (this.#closed) {
      return Promise.reject(new DwspsError("closed", "the client is closed"));
    }
    if (!this.#connected && this.#queue.length >= this.#options.maxQueued) {
      return Promise.reject(
        new DwspsError("queue_full", `${this.#queue.length} requests already wait for a connection`),
      );
    }
    return new Promise((resolve, reject) => {
      const req = { id: this.#nextId++, fields, onAck, resubscribe, resolve, reject, timer: null };
      req.timer = setTimeout(() => this.#timedOut(req), this.#options.timeout);
      // A socket that is closing (its close event not in yet) takes nothing: queue for the next.
      if (this.#connected && this.#ws.readyState === 1) this.#send(req);
      else this.#queue.push(req);
    });
  }

  #send(req) {
    this.#pending.set(req.id, req);
    const frame = { ...req.fields, id: req.id, timestamp: new Date().toJSON() };
    this.#ws.send(JSON.stringify(frame));
  }

  #timedOut(req) {
    this.#pending.delete(req.id);
    const queued = this.#queue.indexOf(req);
    if (queued >= 0) this.#queue.splice(queued, 1);
    const what = this.#connected ? "no reply" : "not connected";
    req.reject(
      new DwspsError("timeout", `${req.fields.type}: ${what} within ${this.#options.timeout} ms`),
    );
  }

  #settle(req, reply) {
    clearTimeout(req.timer);
    this.#pending.delete(req.id);
    if (reply.type !== "error") {
      if (req.onAck) this.#call(req.onAck, reply);
      req.resolve(reply);
    } else {
      const detail = reply.detail ? `: ${reply.detail}` : "";
      req.reject(new DwspsError(reply.error ?? "error", `${reply.error}${detail}`, reply));
    }
  }

  /** The request a reply answers: by id, else the oldest in flight with its action and topic. */
  #requestFor(reply) {
    if (reply.id !== undefined) return this.#pending.get(reply.id);
    const action = reply.type === "history" ? "history" : reply.action;
    for (const req of this.#pending.values()) {
      if (req.fields.type === action && req.fields.topic === reply.topic) return req;
    }
    return undefined;
  }

  // -- the connection --------------------------------------------------------

  #connect() {
    this.#retryTimer = null;
    if (this.#tokenStale && this.#options.tokenProvider) {
      this.#freshToken().then(
        (token) => {
          if (this.#closed) return;
          this.#token = token;
          this.#tokenStale = false;
          this.#open();
        },
        (err) => {
          if (this.#closed) return;
          this.#emit("error", err);
          this.#retryLater(); // a failed provider is a failed attempt
        },
      );
      return;
    }
    this.#open();
  }

  /** The provider's token (a DwspsError `token_provider` if it failed or gave none). */
  async #freshToken() {
    let token;
    try {
      token = await this.#options.tokenProvider();
    } catch (err) {
      throw new DwspsError("token_provider", `the token provider failed: ${err?.message ?? err}`);
    }
    if (typeof token !== "string" || !token) {
      throw new DwspsError("token_provider", `the token provider returned ${typeof token}`);
    }
    return token;
  }

  /** With a provider, renew the token ahead of its `exp` (one timer at a time). */
  #scheduleRefresh(failures = 0) {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#options.tokenProvider || this.#closed) return;
    const exp = this.#token ? expiryOf(this.#token) : null;
    if (exp === null) return;
    const left = exp - Date.now();
    if (left <= 0) return; // the server closes with `token expired`; the reconnect renews it
    const due = failures
      ? Math.min(left, this.#backoff(failures))
      : Math.max(0, left - Math.min(REFRESH_AHEAD, left / 5));
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      this.#freshToken()
        .then((token) => this.refreshToken(token))
        .catch((err) => {
          if (this.#closed) return;
          this.#emit("error", err);
          // A refused token: the server closes (1008) and the reconnect asks again.
          if (err.code !== "unauthorized") this.#scheduleRefresh(failures + 1);
        });
    }, due);
  }

  /** A delay drawn with full jitter for the `attempt`-th retry (the one backoff formula). */
  #backoff(attempt) {
    const bound = Math.min(
      this.#options.backoffMax,
      this.#options.backoffInitial * 2 ** Math.min(attempt, 30),
    );
    return Math.random() * bound;
  }

  #retryLater() {
    this.#retryTimer = setTimeout(() => this.#connect(), this.#backoff(this.#attempt));
    this.#attempt += 1;
  }

  #open() {
    let ws;
    try {
      ws = new this.#WebSocket(withToken(this.#url, this.#token));
    } catch (err) {
      // The URL was checked in the constructor: whatever this is, retrying will not help.
      this.#finish(1002, String(err?.message ?? err));
      return;
    }
    this.#ws = ws;
    this.#wsOpened = false;
    ws.onopen = () => this.#opened(ws);
    ws.onmessage = (event) => this.#received(event.data);
    ws.onclose = (event) => this.#dropped(ws, event.code, event.reason);
    // A failed connection gets a close event (1006) right after the error, which does the
    // work; Node 20's WebSocket sends none after a refused connect, so the error stands in.
    ws.onerror = () => setTimeout(() => this.#dropped(ws, 1006, ""), 0);
  }

  #opened(ws) {
    if (ws !== this.#ws || this.#closed) return;
    this.#wsOpened = true;
    this.#connected = true;
    this.#attempt = 0;
    this.#scheduleRefresh();
    const again = this.#everOpened;
    this.#everOpened = true;
    // Subscriptions first, so that whatever waited (or an `open` listener) publishes into them.
    const resubscribed = again ? this.#resubscribe() : null;
    for (const req of this.#queue.splice(0)) this.#send(req);
    this.#emit("open");
    if (resubscribed) resubscribed.then(() => this.#closed || this.#emit("reconnect"));
  }

  /**
   * Subscribe again to everything held, after a reconnect; resolves when every reply is in.
   * The one place that builds those requests.
   */
  #resubscribe() {
    const held = [...this.#subscriptions].filter(([, entry]) => entry.acked);
    return Promise.all(
      held.map(([topic, entry]) =>
        this.#resubscribeOne(topic, entry).catch((err) => {
          // closed: nothing to do; connection_lost: the next open resubscribes it.
          if (err.code === "closed" || err.code === "connection_lost") return;
          if (this.#subscriptions.get(topic) === entry) this.#subscriptions.delete(topic);
          // An error reply was emitted when it came in; a timeout is news.
          if (!err.reply) this.#emit("error", err);
        }),
      ),
    );
  }

  /** Subscribe `entry` again, recovering from its position when it has one. */
  async #resubscribeOne(topic, entry) {
    const recovery = (ok, reply) => {
      if (ok) expectReplay(entry, reply);
      else takePosition(entry, reply); // start afresh from the server's position
      entry.recovered = ok;
      this.#emit("recovery", topic, ok, reply);
    };
    if (entry.epoch === null || entry.offset === null) {
      return this.#resubscribeRequest({ type: "subscribe", topic }, (r) => takePosition(entry, r));
    }
    const recover = { epoch: entry.epoch, offset: entry.offset };
    try {
      return await this.#resubscribeRequest({ type: "subscribe", topic, recover }, (reply) =>
        recovery(reply.recovered === true, reply),
      );
    } catch (err) {
      if (err.code !== "invalid_message") throw err;
      // This server keeps no history for it (any more): a plain subscribe, messages lost.
      return this.#resubscribeRequest({ type: "subscribe", topic }, (r) => recovery(false, r));
    }
  }

  /** A resubscribe is not sent again after a drop (a second `recover` would replay twice). */
  #resubscribeRequest(fields, onAck) {
    return this.#request(fields, onAck, true);
  }

  #received(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return; // the server sends only JSON text frames
    }
    if (msg === null || typeof msg !== "object") return;
    if (msg.type === "publish") {
      this.#emit("message", msg);
      const entry = this.#subscriptions.get(msg.context);
      if (!entry) return;
      if (entry.stream !== null && msg.stream === entry.stream) {
        if (typeof msg.epoch === "string" && Number.isInteger(msg.offset)) {
          advance(entry, msg.epoch, msg.offset, msg.recovered === true);
        }
      }
      if (entry.handler) this.#call(entry.handler, msg);
      return;
    }
    if (msg.type === "history") {
      const req = this.#requestFor(msg);
      if (req) this.#settle(req, msg);
      return;
    }
    if (msg.type === "ack" || msg.type === "error") {
      const req = this.#requestFor(msg);
      if (req) this.#settle(req, msg);
      if (msg.type === "ack") {
        this.#emit("ack", msg);
      } else {
        this.#emit("error", new DwspsError(msg.error, msg.detail ?? msg.error, msg));
      }
    }
  }

  #dropped(ws, code, reason) {
    if (ws !== this.#ws) return;
    const opened = this.#wsOpened;
    this.#ws = null;
    this.#connected = false;
    if (this.#closed) return;
    this.#emit("disconnect", code, reason);
    // In-flight requests: idempotent ones go again after the reconnect, publishes fail.
    const inFlight = [...this.#pending.values()];
    this.#pending.clear();
    for (const req of inFlight.reverse()) {
      if (req.fields.type === "publish" || req.resubscribe) {
        clearTimeout(req.timer);
        req.reject(
          new DwspsError("connection_lost", `the connection dropped before the ${req.fields.type} was acked`),
        );
      } else {
        this.#queue.unshift(req);
      }
    }
    const provider = this.#options.tokenProvider;
    if (provider && code === 1008 && TOKEN_CLOSE_REASONS.has(reason)) {
      this.#tokenStale = true; // a fresh token cures this one
    } else if (FATAL_CLOSE_CODES.has(code) || !this.#options.reconnect) {
      this.#finish(code, reason);
      return;
    } else if (provider && !opened && this.#token) {
      // Never opened: perhaps a 401 (a browser cannot tell); a due token is renewed first.
      const exp = expiryOf(this.#token);
      if (exp !== null && exp - Date.now() < REFRESH_AHEAD) this.#tokenStale = true;
    }
    this.#retryLater();
  }

  #finish(code, reason) {
    this.#closed = true;
    this.#connected = false;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    const error = new DwspsError("closed", `the client is closed (${code}${reason ? ` ${reason}` : ""})`);
    for (const req of [...this.#pending.values(), ...this.#queue]) {
      clearTimeout(req.timer);
      req.reject(error);
    }
    this.#pending.clear();
    this.#queue = [];
    this.#emit("close", code, reason);
  }

  // -- events ----------------------------------------------------------------

  #listenersOf(event) {
    const set = this.#listeners.get(event);
    if (!set) throw new TypeError(`unknown event ${event}; events: ${EVENTS.join(", ")}`);
    return set;
  }

  #emit(event, ...args) {
    for (const listener of this.#listeners.get(event)) this.#call(listener, ...args);
  }

  /** A listener that throws must not break the client: report it and carry on. */
  #call(fn, ...args) {
    try {
      fn(...args);
    } catch (err) {
      if (typeof globalThis.reportError === "function") globalThis.reportError(err);
      else console.error(err);
    }
  }
}
