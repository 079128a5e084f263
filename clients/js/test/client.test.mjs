// The client against a real `dwsps serve`: requests and acks, deliveries, errors, order,
// requests made before the connection opens, timeouts, the bounded queue while the server is
// down, a drop with requests in flight, and reconnecting after a restart.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, describe, test } from "node:test";

import { Client, DwspsError } from "../dwsps.js";
import { collector, freePort, next, proxy, scaled, serve } from "./helpers.mjs";

describe("against one server", () => {
  let server;
  const clients = [];
  const client = (options) => {
    const c = new Client(server.url, options);
    clients.push(c);
    return c;
  };

  before(async () => {
    server = await serve();
  });
  after(async () => {
    for (const c of clients) c.close();
    await server.stop();
  });

  test("subscribe, publish and unsubscribe resolve with the acks", async () => {
    const c = client();
    const sub = await c.subscribe("news");
    assert.equal(sub.type, "ack");
    assert.equal(sub.action, "subscribe");
    assert.equal(sub.topic, "news");
    assert.equal(typeof sub.id, "number");
    const delivered = next(c, "message");
    const pub = await c.publish("news.uk", { headline: "hello" });
    assert.equal(pub.action, "publish");
    const [delivery] = await delivered;
    assert.equal(delivery.topic, "news.uk");
    assert.equal(delivery.context, "news");
    assert.deepEqual(delivery.message, { headline: "hello" });
    const unsub = await c.unsubscribe("news");
    assert.equal(unsub.action, "unsubscribe");
    assert.deepEqual(c.subscriptions, []);
  });

  test("a subscription handler gets the deliveries of its context only", async () => {
    const c = client();
    const news = collector(2);
    const uk = collector(1);
    await c.subscribe("news", (d) => news.push(d));
    await c.subscribe("news.uk", (d) => uk.push(d));
    await c.publish("news", "one");
    await c.publish("news.uk.london", "two");
    const [first, second] = await news.done;
    assert.deepEqual([first.message, second.message], ["one", "two"]);
    assert.ok([first, second].every((d) => d.context === "news"));
    const [only] = await uk.done;
    assert.equal(only.context, "news.uk");
    assert.equal(only.topic, "news.uk.london");
  });

  test("acks and messages are emitted as events", async () => {
    const c = client();
    const acks = [];
    c.on("ack", (ack) => acks.push(ack.action));
    const message = next(c, "message");
    await c.subscribe("events");
    await c.publish("events", 42);
    const [delivery] = await message;
    assert.equal(delivery.message, 42);
    assert.deepEqual(acks, ["subscribe", "publish"]);
  });

  test("an error reply rejects with a DwspsError carrying the code", async () => {
    const c = client();
    const errors = [];
    c.on("error", (err) => errors.push(err.code));
    await assert.rejects(c.subscribe("news..uk"), (err) => {
      assert.ok(err instanceof DwspsError);
      assert.equal(err.code, "invalid_topic");
      assert.equal(err.reply.action, "subscribe");
      return true;
    });
    await assert.rejects(c.publish("news.*", 1), { code: "invalid_topic" });
    assert.deepEqual(errors, ["invalid_topic", "invalid_topic"]);
    assert.deepEqual(c.subscriptions, []); // a refused subscription is not held
    assert.equal((await c.publish("news", 1)).action, "publish"); // and the connection works
  });

  test("deliveries and acks keep publish order", async () => {
    const c = client();
    const n = 300;
    const got = collector(n);
    await c.subscribe("order", (d) => got.push(d.message));
    const acks = await Promise.all(Array.from({ length: n }, (_, i) => c.publish("order", i)));
    assert.deepEqual(
      acks.map((a) => a.id),
      [...acks.map((a) => a.id)].sort((a, b) => a - b),
    );
    assert.deepEqual(await got.done, Array.from({ length: n }, (_, i) => i));
  });

  test("requests made before the connection opens wait for it", async () => {
    const c = client();
    assert.equal(c.connected, false);
    const message = next(c, "message");
    const opened = next(c, "open");
    const [sub, pub] = await Promise.all([c.subscribe("early"), c.publish("early", "first")]);
    assert.equal(sub.action, "subscribe");
    assert.equal(pub.action, "publish");
    assert.equal((await message)[0].message, "first");
    await opened;
    assert.equal(c.connected, true);
  });

  test("the WebSocket constructor can be passed in", async () => {
    const made = [];
    class Counted extends globalThis.WebSocket {
      constructor(url) {
        super(url);
        made.push(url);
      }
    }
    const c = client({ WebSocket: Counted });
    await c.publish("anything", null);
    assert.deepEqual(made, [server.url]);
  });

  test("close() rejects what waits and emits close once", async () => {
    const c = client();
    await next(c, "open");
    const closes = [];
    c.on("close", (code) => closes.push(code));
    c.close();
    c.close();
    assert.deepEqual(closes, [1000]);
    await assert.rejects(c.publish("x", 1), { code: "closed" });
  });
});

test("a URL that is not ws:// or wss:// is refused at once", () => {
  assert.throws(() => new Client("http://127.0.0.1:8000"), TypeError);
  assert.throws(() => new Client("not a url"), TypeError);
});

test("a request that gets no connection rejects with code timeout", async () => {
  // A TCP server that accepts and never answers: the upgrade never completes.
  const silent = createServer(() => {});
  await new Promise((ok) => silent.listen(0, "127.0.0.1", ok));
  const c = new Client(`ws://127.0.0.1:${silent.address().port}`, { timeout: scaled(300) });
  try {
    await assert.rejects(c.publish("news", 1), (err) => {
      assert.equal(err.code, "timeout");
      assert.match(err.message, /not connected/);
      return true;
    });
  } finally {
    c.close();
    silent.close();
    for (const sock of silent.connections ?? []) sock.destroy();
    silent.closeAllConnections?.();
  }
});

test("after the server restarts, the client reconnects and resubscribes", async () => {
  const port = await freePort();
  let server = await serve([], port);
  const c = new Client(server.url, { backoffInitial: 50, backoffMax: 500 });
  try {
    const got = collector(2);
    await c.subscribe("restart", (d) => got.push(d.message));
    await c.publish("restart", "before");
    const disconnected = next(c, "disconnect");
    const reconnected = next(c, "reconnect", scaled(20000));
    await server.stop();
    const [code] = await disconnected;
    assert.equal(code, 1001); // going away: the server shut down gracefully
    // Made while the server is down: waits for the new connection.
    const waiting = c.publish("restart", "after");
    server = await serve([], port);
    await reconnected;
    assert.equal((await waiting).action, "publish");
    assert.deepEqual(await got.done, ["before", "after"]);
    assert.deepEqual(c.subscriptions, ["restart"]);
  } finally {
    c.close();
    await server.stop();
  }
});

test("while the server is down, at most maxQueued requests wait; more reject with queue_full", async () => {
  const port = await freePort(); // nothing listens yet: every attempt is refused
  const c = new Client(`ws://127.0.0.1:${port}`, {
    maxQueued: 2,
    backoffInitial: 20,
    backoffMax: 200,
    timeout: scaled(20000),
  });
  let server;
  try {
    const first = c.publish("queued", 1);
    const second = c.subscribe("queued");
    await assert.rejects(c.publish("queued", 3), (err) => {
      assert.ok(err instanceof DwspsError);
      assert.equal(err.code, "queue_full");
      assert.match(err.message, /2 requests already wait/);
      return true;
    });
    assert.equal(c.connected, false);
    // The two that waited go out, in call order, once the server is there.
    server = await serve([], port);
    const [pub, sub] = await Promise.all([first, second]);
    assert.equal(pub.action, "publish");
    assert.equal(sub.action, "subscribe");
    assert.ok(pub.id < sub.id);
    // Connected, the bound no longer applies.
    const acks = await Promise.all([1, 2, 3, 4].map((i) => c.publish("queued", i)));
    assert.equal(acks.length, 4);
  } finally {
    c.close();
    await server?.stop();
  }
});

test("a drop with requests in flight: the publish rejects with connection_lost, the subscribe goes again", async () => {
  const server = await serve();
  const link = await proxy(server.port);
  const c = new Client(link.url, { backoffInitial: 20, backoffMax: 200 });
  const publisher = new Client(server.url);
  try {
    await next(c, "open");
    const dropped = next(c, "disconnect");
    const published = c.publish("lost", "maybe delivered");
    const subscribed = c.subscribe("lost.after");
    // Sent, but cut in this same tick: no reply can come back on that connection.
    link.cut();
    await assert.rejects(published, (err) => {
      assert.ok(err instanceof DwspsError);
      assert.equal(err.code, "connection_lost");
      assert.match(err.message, /publish was acked/);
      return true;
    });
    const [code] = await dropped;
    assert.equal(code, 1006); // abnormal: no close frame came
    const reopened = next(c, "open", scaled(20000));
    link.restore();
    await reopened;
    // The subscribe was in flight too: idempotent, so it was sent again and holds.
    assert.equal((await subscribed).action, "subscribe");
    const delivery = next(c, "message");
    await publisher.publish("lost.after", "after the drop");
    const [d] = await delivery;
    assert.equal(d.context, "lost.after");
    assert.equal(d.message, "after the drop");
  } finally {
    c.close();
    publisher.close();
    await link.close();
    await server.stop();
  }
});
