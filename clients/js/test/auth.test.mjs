// Tokens against a server with --auth-jwt-secret: `?token=` at the upgrade, and
// refreshToken() replacing the connection's token (and so its permissions).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../dwsps.js";
import { hs256, next, serve } from "./helpers.mjs";

const SECRET = "node-test-secret-0123456789abcdef";
const hour = () => Math.floor(Date.now() / 1000) + 3600;
const token = (claims) => hs256(SECRET, { sub: "node", exp: hour(), ...claims });

let server;
const clients = [];
const client = (options) => {
  const c = new Client(server.url, { backoffInitial: 50, backoffMax: 200, ...options });
  clients.push(c);
  return c;
};

before(async () => {
  server = await serve(["--auth-jwt-secret", SECRET]);
});
after(async () => {
  for (const c of clients) c.close();
  await server.stop();
});

test("the token goes in the URL and admits the client", async () => {
  const c = client({ token: token({}) });
  const ack = await c.publish("news", "with a token");
  assert.equal(ack.action, "publish");
});

test("without a token the upgrade is refused and the client keeps trying", async () => {
  const c = client();
  const opened = [];
  c.on("open", () => opened.push(true));
  const [code] = await next(c, "disconnect");
  assert.equal(code, 1006); // HTTP 401: the WebSocket never opened
  await next(c, "disconnect"); // and again, after a backoff
  assert.deepEqual(opened, []);
});

test("refreshToken replaces the token and its permissions", async () => {
  const c = client({ token: token({ dwsps: { subscribe: ["a"], publish: ["a"] } }) });
  assert.equal((await c.publish("a", 1)).action, "publish");
  await assert.rejects(c.publish("b", 1), { code: "forbidden" });
  const ack = await c.refreshToken(token({ dwsps: { subscribe: ["b"], publish: ["b"] } }));
  assert.equal(ack.action, "auth");
  assert.equal((await c.publish("b", 2)).action, "publish");
  await assert.rejects(c.publish("a", 2), { code: "forbidden" });
});

test("a bad token in refreshToken is unauthorized and ends the client", async () => {
  const c = client({ token: token({}) });
  await next(c, "open");
  const closed = next(c, "close");
  await assert.rejects(c.refreshToken(hs256("another secret", { exp: hour() })), {
    code: "unauthorized",
  });
  const [code] = await closed;
  assert.equal(code, 1008);
  await assert.rejects(c.publish("a", 1), { code: "closed" });
});

const inSeconds = (s) => Math.floor(Date.now() / 1000) + s;

test("a tokenProvider gives the first token and renews it ahead of exp on the same connection", async () => {
  const issued = [];
  const c = client({
    tokenProvider: async () => {
      issued.push(hs256(SECRET, { sub: `p-${issued.length + 1}`, exp: inSeconds(3) }));
      return issued.at(-1);
    },
  });
  const drops = [];
  c.on("disconnect", (code) => drops.push(code));
  await next(c, "open");
  assert.equal(issued.length, 1);
  // Two renewals (each at most a fifth of its 3 s early) take the connection past both exps.
  const acks = [];
  c.on("ack", (ack) => ack.action === "auth" && acks.push(ack));
  while (acks.length < 2) await next(c, "ack");
  assert.equal((await c.publish("news", "still open")).action, "publish");
  assert.deepEqual(drops, []);
  assert.equal(issued.length, 3);
});

test("with a tokenProvider, token expired reconnects with a fresh token", async () => {
  let calls = 0;
  let expired = false;
  const c = client({
    tokenProvider: () => {
      calls += 1;
      if (calls === 1) return hs256(SECRET, { sub: "short", exp: inSeconds(2) });
      if (!expired) throw new Error("identity service down"); // the renewal ahead of exp fails
      return token({ sub: "fresh" });
    },
  });
  const errors = [];
  c.on("error", (err) => errors.push(err.code));
  c.on("close", () => assert.fail("the client must not close"));
  await next(c, "open");
  await c.subscribe("news");
  const [code, reason] = await next(c, "disconnect");
  expired = true;
  assert.deepEqual([code, reason], [1008, "token expired"]);
  await next(c, "reconnect");
  assert.ok(errors.length >= 1 && errors.every((e) => e === "token_provider"), errors.join());
  assert.deepEqual(c.subscriptions, ["news"]);
  assert.equal((await c.publish("news", "after")).action, "publish");
});
