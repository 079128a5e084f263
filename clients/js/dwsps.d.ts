// TypeScript declarations for dwsps.js (the dwsps client for browsers and Node.js >= 20).

/** A delivery: one published message, for one matching subscription (`context`). */
export interface Delivery {
  type: "publish";
  timestamp: string;
  /** Where the message was published. */
  topic: string;
  /** The subscription that matched. */
  context: string;
  message: unknown;
  fromPeerServer?: boolean;
  /** On a topic with history: its stream, offset and epoch. */
  stream?: string;
  offset?: number;
  epoch?: string;
  /** True on a delivery replayed by recovery. */
  recovered?: boolean;
  [field: string]: unknown;
}

/** A held subscription and where it is in its history stream (null: no history). */
export interface SubscriptionState {
  topic: string;
  stream: string | null;
  epoch: string | null;
  /** The last position received (after a recovery's replay, the ack's offset): the next
   * recovery replays what came after it. */
  offset: number | null;
  /** After the last reconnect: true when everything missed was replayed, false when messages
   * were lost; null before any reconnect, or without history. */
  recovered: boolean | null;
}

/** The reply to a `history` request. */
export interface HistoryReply {
  type: "history";
  topic: string;
  stream: string;
  epoch: string;
  offset: number;
  /** At most `limit` of the latest kept publications, oldest first. */
  publications: Delivery[];
  truncated?: boolean;
  id?: number | string;
  [field: string]: unknown;
}

/** The server's acknowledgement of a request. */
export interface Ack {
  type: "ack";
  action: "subscribe" | "unsubscribe" | "publish" | "auth" | string;
  timestamp: string;
  topic?: string;
  id?: number | string;
  [field: string]: unknown;
}

/** The server's error reply. */
export interface ErrorReply {
  type: "error";
  timestamp: string;
  error: string;
  detail?: string;
  action?: string;
  id?: number | string;
  [field: string]: unknown;
}

/** A WebSocket constructor (the browser's, Node's global one, or e.g. the `ws` package's). */
export type WebSocketConstructor = new (url: string) => {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
};

export interface ClientOptions {
  /** A JWT, sent as `?token=` in the URL (browsers cannot set headers). */
  token?: string;
  /**
   * Returns a fresh token: asked for the first one when `token` is not given, shortly before
   * each token's `exp` (renewed with refreshToken on the open connection), and before
   * reconnecting after 1008 `token expired` / `unauthorized`, which then do not end the client.
   * A provider that throws or rejects emits an `error` (code `token_provider`) and is retried.
   */
  tokenProvider?: () => string | Promise<string>;
  /** The WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** How long a request waits for its reply, including time spent disconnected (ms, 10000). */
  timeout?: number;
  /** The first reconnect delay bound (ms, 100); doubles per attempt, full jitter. */
  backoffInitial?: number;
  /** The largest reconnect delay bound (ms, 10000). */
  backoffMax?: number;
  /** How many requests may wait for a connection (1024); more reject with `queue_full`. */
  maxQueued?: number;
  /** Reconnect after a drop (true). */
  reconnect?: boolean;
}

/**
 * A failed request. `code` is the server's error code (`invalid_topic`, `forbidden`,
 * `rate_limited`, `unauthorized`, …) or the client's own: `timeout`, `connection_lost`
 * (a publish in flight when the connection dropped), `queue_full`, `closed`, `token_provider`.
 */
export class DwspsError extends Error {
  constructor(code: string, message: string, reply?: ErrorReply);
  readonly code: string;
  readonly reply?: ErrorReply;
}

export interface ClientEvents {
  /** Each time a connection opens (on a reconnect: once the resubscribes are sent; `reconnect` follows their acks). */
  open: () => void;
  /** Every delivery. */
  message: (delivery: Delivery) => void;
  /** Every ack. */
  ack: (ack: Ack) => void;
  /** Every error reply (and a resubscribe that failed without one). */
  error: (error: DwspsError) => void;
  /** Each time a connection drops (the client will reconnect unless it closes). */
  disconnect: (code: number, reason: string) => void;
  /** A reconnect is complete: every held subscription is subscribed again. */
  reconnect: () => void;
  /** A subscription with history was resubscribed, before any replayed delivery;
   * `recovered` false means messages published meanwhile are lost. */
  recovery: (topic: string, recovered: boolean, reply: Ack) => void;
  /** Once, when the client is finished (close(), or a close code retrying cannot cure). */
  close: (code: number, reason: string) => void;
}

export class Client {
  /** Connects at once, and again after every drop until close(); TypeError unless ws:/wss:. */
  constructor(url: string, options?: ClientOptions);
  /** Whether the connection is open right now. */
  readonly connected: boolean;
  /** The topics this client holds. */
  readonly subscriptions: string[];
  /** The held subscription `topic` (its history position and `recovered` flag), if any. */
  subscription(topic: string): SubscriptionState | undefined;
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): this;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): this;
  /** `handler` gets each delivery whose context is this subscription. */
  subscribe(topic: string, handler?: (delivery: Delivery) => void): Promise<Ack>;
  unsubscribe(topic: string): Promise<Ack>;
  publish(topic: string, message?: unknown): Promise<Ack>;
  /** The latest kept publications of `topic` (`limit` 100); with `since`, only those after it.
   * Rejects with `invalid_message` when no history is kept for `topic`. */
  history(
    topic: string,
    options?: { limit?: number; since?: { epoch: string; offset: number } },
  ): Promise<HistoryReply>;
  /** Sends an `auth` request with the new token; later reconnects use it too. */
  refreshToken(token: string): Promise<Ack>;
  close(code?: number, reason?: string): void;
}
