// Test helpers: a real `dwsps serve` process per test, a TCP proxy that can cut connections,
// events awaited with a deadline, JWTs.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createConnection, createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(HERE, "../../..");

/** The dwsps command: $DWSPS_BIN (set by the caller), else the repo's .venv. */
export const DWSPS_BIN = process.env.DWSPS_BIN || resolve(REPO, ".venv/bin/dwsps");

/** Timeouts stretch with DWSPS_TEST_TIME_SCALE, as in the Python suite. */
const SCALE = Number(process.env.DWSPS_TEST_TIME_SCALE || "1");
export const scaled = (ms) => ms * SCALE;

/** A port free right now on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** `dwsps serve --port PORT ARGS`, resolved once it listens; stop() ends it. */
export async function serve(args = [], port = 0) {
  const child = spawn(DWSPS_BIN, ["serve", "--host", "127.0.0.1", "--port", String(port), ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PYTHONUNBUFFERED: "1" },
  });
  let output = "";
  const exited = new Promise((ok) => child.on("exit", (code) => ok(code)));
  const url = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`dwsps serve did not listen:\n${output}`)), scaled(20000));
    const read = (chunk) => {
      output += chunk;
      const m = /dwsps listening on (wss?:\/\/\S+)/.exec(output);
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    };
    child.stdout.on("data", read);
    child.stderr.on("data", read);
    child.on("error", (err) => fail(new Error(`cannot run ${DWSPS_BIN}: ${err.message}`)));
    exited.then((code) => fail(new Error(`dwsps serve exited ${code}:\n${output}`)));
  });
  return {
    url,
    port: Number(url.split(":").pop()),
    output: () => output,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), scaled(10000));
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A TCP proxy to `port` on 127.0.0.1: cut() drops every connection and refuses new ones. */
export async function proxy(port) {
  const sockets = new Set();
  let down = false;
  const server = createServer((inbound) => {
    if (down) return inbound.destroy();
    const outbound = createConnection({ host: "127.0.0.1", port });
    for (const [a, b] of [
      [inbound, outbound],
      [outbound, inbound],
    ]) {
      sockets.add(a);
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    cut() {
      down = true;
      for (const s of sockets) s.destroy();
    },
    restore() {
      down = false;
    },
    close() {
      this.cut();
      return new Promise((ok) => server.close(ok));
    },
  };
}

/** Resolve with the arguments of the next `event` of `emitter` (a Client), or fail in time. */
export function next(client, event, ms = scaled(10000)) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => {
      client.off(event, listener);
      fail(new Error(`no ${event} event within ${ms} ms`));
    }, ms);
    const listener = (...args) => {
      clearTimeout(timer);
      client.off(event, listener);
      ok(args);
    };
    client.on(event, listener);
  });
}

/** Collect values until `count` arrived; `.done` resolves with them (or fails in time). */
export function collector(count, ms = scaled(10000)) {
  const items = [];
  let finish;
  const done = new Promise((ok, fail) => {
    const timer = setTimeout(
      () => fail(new Error(`got ${items.length} of ${count} within ${ms} ms`)),
      ms,
    );
    finish = () => {
      clearTimeout(timer);
      ok(items);
    };
  });
  return {
    items,
    done,
    push(item) {
      items.push(item);
      if (items.length === count) finish();
    },
  };
}

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT for `claims` signed with `secret` (node:crypto, no package needed). */
export function hs256(secret, claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
