// Compiled (never run) by tests/test_js_types.py with `tsc --noEmit --strict`: the API of
// clients/js/dwsps.d.ts as a TypeScript user writes it. Each @ts-expect-error line must stay
// an error, so declarations that decay to `any` fail the check too.
import { Client, DwspsError } from "../../clients/js/dwsps.js";
import type {
  Ack,
  ClientOptions,
  Delivery,
  HistoryReply,
  SubscriptionState,
} from "../../clients/js/dwsps.js";

const options: ClientOptions = {
  token: "a.b.c",
  tokenProvider: async () => "d.e.f",
  timeout: 5000,
  backoffInitial: 100,
  backoffMax: 10000,
  maxQueued: 64,
  reconnect: true,
};
const client = new Client("ws://localhost:8000", options);

client
  .on("open", () => undefined)
  .on("message", (d: Delivery) => console.log(d.topic, d.context, d.message, d.fromPeerServer))
  .on("ack", (ack: Ack) => console.log(ack.action, ack.topic))
  .on("error", (err: DwspsError) => console.log(err.code, err.reply?.error))
  .on("disconnect", (code: number, reason: string) => console.log(code, reason))
  .on("reconnect", () => undefined)
  .on("recovery", (topic: string, recovered: boolean, reply: Ack) =>
    console.log(topic, recovered, reply.id),
  )
  .on("close", (code: number, reason: string) => console.log(code, reason));

async function use(): Promise<void> {
  const sub: Ack = await client.subscribe("news", (d) => {
    const offset: number | undefined = d.offset;
    console.log(d.context.toUpperCase(), offset, d.recovered === true);
  });
  const pub: Ack = await client.publish("news.uk", { headline: "hello" });
  await client.publish("news.uk"); // the message is optional (null)
  const unsub: Ack = await client.unsubscribe("news");
  const auth: Ack = await client.refreshToken("g.h.i");
  const kept: HistoryReply = await client.history("chat.room1", {
    limit: 10,
    since: { epoch: "e", offset: 3 },
  });
  const first: Delivery | undefined = kept.publications[0];
  const state: SubscriptionState | undefined = client.subscription("news");
  const held: string[] = client.subscriptions;
  const up: boolean = client.connected;
  console.log(sub, pub, unsub, auth, first, state?.recovered, held, up);
  try {
    await client.publish("news.*", 1);
  } catch (err) {
    if (err instanceof DwspsError) {
      const code: string = err.code;
      console.log(code, err.message, err.reply?.detail);
    }
  }
  client.close();
  client.close(1000, "bye");
}

// What the declarations must refuse:
// @ts-expect-error an event the client does not have
client.on("closed", () => undefined);
// @ts-expect-error a message listener gets a Delivery, not a number
client.on("message", (d: number) => d);
// @ts-expect-error publish needs a topic
client.publish();
// @ts-expect-error topics are strings
client.subscribe(42);
// @ts-expect-error no such option
new Client("ws://localhost:8000", { retries: 3 });
// @ts-expect-error connected is read-only
client.connected = true;
// @ts-expect-error the ack's promise is not a Delivery
const wrong: Promise<Delivery> = client.publish("x", 1);

void use;
void wrong;
