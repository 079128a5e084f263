// History recovery against a real `dwsps serve --history 'chat.*:1000'`: a connection cut by a
// TCP proxy in this process recovers every offset exactly once, a restart (new epoch) reports
// `recovered: false`, and history() answers with the kept publications.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client } from "../dwsps.js";
import { collector, freePort, next, proxy, scaled, serve } from "./helpers.mjs";

const HISTORY = ["--history", "chat.*:1000"];

describe("recovery", () => {
  let server;
  const clients = [];
  const client = (url, options) => {
    const c = new Client(url, { backoffInitial: 20, backoffMax: 200, ...options });
    clients.push(c);
    return c;
  };

  before(async () => {
    server = await serve(HISTORY);
  });
  after(async () => {
    for (const c of clients) c.close();
    await server.stop();
  });

  test("a cut connection recovers every offset exactly once, in order", async () => {
    const link = await proxy(server.port);
    try {
      const sub = client(link.url);
      const pub = client(server.url);
      const log = [];
      const got = collector(30, scaled(20000));
      const tenth = collector(10);
      sub.on("recovery", (topic, recovered) => log.push(["recovery", topic, recovered]));
      const ack = await sub.subscribe("chat.room1", (d) => {
        log.push(["delivery", d.offset, d.recovered === true]);
        got.push(d);
        if (d.offset <= 10) tenth.push(d);
      });
      assert.equal(ack.stream, "chat.room1");
      assert.equal(ack.offset, 0);
      const first = sub.subscription("chat.room1");
      assert.equal(first.epoch, ack.epoch);
      assert.equal(first.recovered, null);

      for (let i = 1; i <= 10; i++) await pub.publish("chat.room1", i);
      await tenth.done;
      assert.equal(sub.subscription("chat.room1").offset, 10);
      const dropped = next(sub, "disconnect");
      link.cut();
      await dropped;
      for (let i = 11; i <= 20; i++) await pub.publish("chat.room1", i);
      const reconnected = next(sub, "reconnect", scaled(20000));
      link.restore();
      await reconnected;
      for (let i = 21; i <= 30; i++) await pub.publish("chat.room1", i);

      const items = await got.done;
      assert.deepEqual(
        items.map((d) => d.offset),
        Array.from({ length: 30 }, (_, i) => i + 1),
      );
      assert.deepEqual(
        items.map((d) => d.message),
        Array.from({ length: 30 }, (_, i) => i + 1),
      );
      // The recovery event comes before the first replayed delivery, which are 11..20.
      const at = log.findIndex(([kind]) => kind === "recovery");
      assert.deepEqual(log[at], ["recovery", "chat.room1", true]);
      assert.deepEqual(log[at + 1], ["delivery", 11, true]);
      assert.equal(log.filter(([kind]) => kind === "recovery").length, 1);
      const state = sub.subscription("chat.room1");
      assert.equal(state.recovered, true);
      assert.equal(state.offset, 30);
      assert.equal(state.stream, "chat.room1");
    } finally {
      await link.close();
    }
  });

  test("history() answers with the latest publications, and after `since`", async () => {
    const c = client(server.url);
    for (let i = 1; i <= 5; i++) await c.publish("chat.hist", { n: i });
    const reply = await c.history("chat.hist", { limit: 3 });
    assert.equal(reply.type, "history");
    assert.equal(reply.offset, 5);
    assert.deepEqual(
      reply.publications.map((d) => d.message.n),
      [3, 4, 5],
    );
    const since = await c.history("chat.hist", { since: { epoch: reply.epoch, offset: 4 } });
    assert.deepEqual(
      since.publications.map((d) => d.offset),
      [5],
    );
    await assert.rejects(c.history("news"), { code: "invalid_message" });
  });
});

test("after a restart (a new epoch) recovery reports recovered: false", async () => {
  const port = await freePort();
  let server = await serve(HISTORY, port);
  const c = new Client(server.url, { backoffInitial: 20, backoffMax: 200 });
  try {
    const ack = await c.subscribe("chat.lost");
    const delivered = next(c, "message");
    await c.publish("chat.lost", "before");
    await delivered;
    assert.equal(c.subscription("chat.lost").offset, 1);
    await server.stop();
    const recovery = next(c, "recovery", scaled(20000));
    server = await serve(HISTORY, port);
    const [topic, recovered, reply] = await recovery;
    assert.equal(topic, "chat.lost");
    assert.equal(recovered, false);
    assert.notEqual(reply.epoch, ack.epoch);
    const state = c.subscription("chat.lost");
    assert.equal(state.recovered, false);
    assert.equal(state.epoch, reply.epoch);
    assert.equal(state.offset, 0);
  } finally {
    c.close();
    await server.stop();
  }
});

test("a narrow subscription recovers after sibling traffic trimmed its old position", async () => {
  // chat.r.typing in stream chat.r, 200 kept: it gets nothing for chat.r.msgs' offsets, so
  // only the ack's offset (taken once the replay is in) keeps its position within reach.
  const server = await serve(["--history", "chat.*:200"]);
  const link = await proxy(server.port);
  const sub = new Client(link.url, { backoffInitial: 20, backoffMax: 200 });
  const pub = new Client(server.url);
  const offsets = [];
  const waiting = new Map();
  const arrived = (offset) =>
    offsets.includes(offset) ? Promise.resolve() : new Promise((ok) => waiting.set(offset, ok));
  const away = async (topics) => {
    const dropped = next(sub, "disconnect");
    link.cut();
    await dropped;
    for (const topic of topics) await pub.publish(topic, topic.endsWith("typing") ? "t" : "x");
    const recovery = next(sub, "recovery", scaled(20000));
    link.restore();
    return recovery;
  };
  try {
    await sub.subscribe("chat.r.typing", (d) => {
      offsets.push(d.offset);
      waiting.get(d.offset)?.();
    });
    await pub.publish("chat.r.typing", "t");
    await arrived(1);
    const siblings = Array(75).fill("chat.r.msgs");
    // Offsets 2..152, the one typing message at 77: replayed, then the ack's offset.
    const [, first, firstAck] = await away([...siblings, "chat.r.typing", ...siblings]);
    assert.equal(first, true);
    assert.equal(firstAck.replay, 1);
    await arrived(77);
    assert.equal(sub.subscription("chat.r.typing").offset, 152);
    // 153..302: offset 78 is trimmed, 153 is kept.
    const [, second, secondAck] = await away(Array(150).fill("chat.r.msgs"));
    assert.equal(second, true);
    assert.equal(secondAck.replay, 0);
    assert.equal(sub.subscription("chat.r.typing").offset, 302);
    await pub.publish("chat.r.typing", "t");
    await arrived(303);
    assert.deepEqual(offsets, [1, 77, 303]);
  } finally {
    sub.close();
    pub.close();
    await link.close();
    await server.stop();
  }
});
