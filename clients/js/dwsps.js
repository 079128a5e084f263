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

/** Close codes that reconnecting cannot cure: the client stops and emits `close`. */
const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008]);

const EVENTS = ["open", "message", "ack", "error", "disconnect", "reconnect", "close"];

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
  #ws = null;
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
  /** topic -> { handler, acked } */
  #subscriptions = new Map();
  #listeners = new Map(EVENTS.map((e) => [e, new Set()]));

  /**
   * Connects at once (and again after every drop, until close()).
   * @param {string} url ws:// or wss:// URL of a dwsps server
   * @param {object} [options] token, WebSocket, timeout, backoffInitial, backoffMax, maxQueued,
   *   reconnect (see dwsps.d.ts)
   */
  constructor(url, options = {}) {
    const parsed = new URL(url); // a TypeError for a malformed URL, at once
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`a dwsps URL starts with ws:// or wss://, not ${parsed.protocol}//`);
    }
    this.#url = url;
    this.#options = { ...DEFAULTS, ...options };
    this.#token = options.token;
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
   * Subscribe to `topic`; `handler` gets each delivery whose context is this subscription.
   * Resolves with the ack, rejects with a DwspsError.
   */
  subscribe(topic, handler) {
    const previous = this.#subscriptions.get(topic);
    const entry = { handler: handler ?? previous?.handler, acked: previous?.acked ?? false };
    this.#subscriptions.set(topic, entry);
    const done = this.#request({ type: "subscribe", topic });
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
   * Replace the connection's token (an `auth` request) before the old one expires; later
   * reconnects use the new token too. Resolves with the ack; a bad token rejects with
   * `unauthorized` and the server closes the connection (1008), which ends the client.
   */
  refreshToken(token) {
    this.#token = token;
    return this.#request({ type: "auth", token });
  }

  /** Close for good: pending requests reject with `closed`, `close` is emitted once. */
  close(code = 1000, reason = "") {
    if (this.#closed) return;
    this.#finish(code, reason);
    const ws = this.#ws;
    if (ws && ws.readyState <= 1) ws.close(code, reason);
  }

  // -- requests ------------------------------------------------------------

  #request(fields) {
    if (this.#closed) {
      return Promise.reject(new DwspsError("closed", "the client is closed"));
    }
    if (!this.#connected && this.#queue.length >= this.#options.maxQueued) {
      return Promise.reject(
        new DwspsError("queue_full", `${this.#queue.length} requests already wait for a connection`),
      );
    }
    return new Promise((resolve, reject) => {
      const req = { id: this.#nextId++, fields, resolve, reject, timer: null };
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
    if (reply.type === "ack") {
      req.resolve(reply);
    } else {
      const detail = reply.detail ? `: ${reply.detail}` : "";
      req.reject(new DwspsError(reply.error ?? "error", `${reply.error}${detail}`, reply));
    }
  }

  /** The request a reply answers: by id, else the oldest in flight with its action and topic. */
  #requestFor(reply) {
    if (reply.id !== undefined) return this.#pending.get(reply.id);
    for (const req of this.#pending.values()) {
      if (req.fields.type === reply.action && req.fields.topic === reply.topic) return req;
    }
    return undefined;
  }

  // -- the connection --------------------------------------------------------

  #connect() {
    this.#retryTimer = null;
    let ws;
    try {
      ws = new this.#WebSocket(withToken(this.#url, this.#token));
    } catch (err) {
      // The URL was checked in the constructor: whatever this is, retrying will not help.
      this.#finish(1002, String(err?.message ?? err));
      return;
    }
    this.#ws = ws;
    ws.onopen = () => this.#opened(ws);
    ws.onmessage = (event) => this.#received(event.data);
    ws.onclose = (event) => this.#dropped(ws, event.code, event.reason);
    // A failed connection gets a close event (1006) right after the error, which does the
    // work; Node 20's WebSocket sends none after a refused connect, so the error stands in.
    ws.onerror = () => setTimeout(() => this.#dropped(ws, 1006, ""), 0);
  }

  #opened(ws) {
    if (ws !== this.#ws || this.#closed) return;
    this.#connected = true;
    this.#attempt = 0;
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
   * The one place that builds those requests: history recovery (PROTOCOL.md, "History and
   * recovery") will add `recover: {epoch, offset}` per subscription here.
   */
  #resubscribe() {
    const held = [...this.#subscriptions].filter(([, entry]) => entry.acked);
    return Promise.all(
      held.map(([topic]) =>
        this.#request({ type: "subscribe", topic }).catch((err) => {
          if (err.code === "closed") return;
          this.#subscriptions.delete(topic);
          // An error reply was emitted when it came in; a timeout is news.
          if (!err.reply) this.#emit("error", err);
        }),
      ),
    );
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
      const handler = this.#subscriptions.get(msg.context)?.handler;
      if (handler) this.#call(handler, msg);
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
    this.#ws = null;
    this.#connected = false;
    if (this.#closed) return;
    this.#emit("disconnect", code, reason);
    // In-flight requests: idempotent ones go again after the reconnect, publishes fail.
    const inFlight = [...this.#pending.values()];
    this.#pending.clear();
    for (const req of inFlight.reverse()) {
      if (req.fields.type === "publish") {
        clearTimeout(req.timer);
        req.reject(
          new DwspsError("connection_lost", "the connection dropped before the publish was acked"),
        );
      } else {
        this.#queue.unshift(req);
      }
    }
    if (FATAL_CLOSE_CODES.has(code) || !this.#options.reconnect) {
      this.#finish(code, reason);
      return;
    }
    const bound = Math.min(
      this.#options.backoffMax,
      this.#options.backoffInitial * 2 ** Math.min(this.#attempt, 30),
    );
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => this.#connect(), Math.random() * bound);
  }

  #finish(code, reason) {
    this.#closed = true;
    this.#connected = false;
    clearTimeout(this.#retryTimer);
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
