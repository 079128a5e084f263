// Interop check: a Node.js client using the npm `ws` package (the library the
// original dwsps is built on) talks to a Python dwsps server the way the
// original client does: {type, topic, message, timestamp}, no ids.
//
// Usage: node client_interop.mjs ws://127.0.0.1:PORT[/?token=JWT]
// A query string (a token for a server that requires one) is kept on every
// connection, whatever its path, as an original client passes its URL through.
// Prints one JSON line {"ok": true|false, "checks": [...], "error"?: "..."}
// and exits 0 only if every check passed.

import assert from 'node:assert/strict'
import WebSocket from 'ws'

const given = new URL(process.argv[2])
const base = `${given.protocol}//${given.host}`
const query = given.search
const checks = []
const JS_DATE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/

function check (name, fn) {
  fn()
  checks.push(name)
}

// A connection with an inbox: every text message parsed, taken in order.
function open (path) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path + query)
    const inbox = []
    let wake = null
    ws.on('message', (data, isBinary) => {
      inbox.push(isBinary ? { binary: data } : JSON.parse(data.toString('utf8')))
      if (wake) wake()
    })
    ws.on('error', reject)
    ws.on('open', () => {
      const client = {
        ws,
        send (obj) { ws.send(JSON.stringify(obj)) },
        // Like the original client: every request carries a timestamp.
        request (type, topic, message) {
          const req = { type, topic, timestamp: new Date().toJSON() }
          if (message !== undefined) req.message = message
          ws.send(JSON.stringify(req))
          return req
        },
        async next (what = 'a message', ms = 5000) {
          const deadline = Date.now() + ms
          while (inbox.length === 0) {
            const left = deadline - Date.now()
            if (left <= 0) throw new Error(`timed out waiting for ${what}`)
            await new Promise(resolve => {
              const t = setTimeout(resolve, left)
              wake = () => { clearTimeout(t); wake = null; resolve() }
            })
          }
          return inbox.shift()
        },
        inbox
      }
      resolve(client)
    })
  })
}

function checkAck (ack, action, topic) {
  assert.equal(ack.type, 'ack', JSON.stringify(ack))
  assert.equal(ack.action, action)
  assert.equal(ack.topic, topic)
  assert.match(ack.timestamp, JS_DATE)
  assert.equal(new Date(ack.timestamp).toJSON(), ack.timestamp)
  assert.ok(Math.abs(Date.now() - Date.parse(ack.timestamp)) < 60_000, 'ack time is now')
  assert.equal(ack.id, undefined, 'no id requested, none echoed')
}

async function run () {
  const a = await open('/')
  const b = await open('/any/path/at/all')

  // Subscriptions: a holds a parent and a child; b a wildcard.
  a.request('subscribe', 'interop')
  checkAck(await a.next('subscribe ack'), 'subscribe', 'interop')
  a.request('subscribe', 'interop.news')
  checkAck(await a.next('subscribe ack'), 'subscribe', 'interop.news')
  b.request('subscribe', 'interop.*.weather')
  checkAck(await b.next('subscribe ack'), 'subscribe', 'interop.*.weather')
  checks.push('subscribe acks')

  // Publish to a topic both of a's subscriptions match: two deliveries, then the ack.
  const message = { hello: 'wörld ✓', n: [1, 2.5, null, true], nested: { deep: 'yes' } }
  const req = a.request('publish', 'interop.news.uk', message)
  const got = [await a.next('delivery 1'), await a.next('delivery 2')]
  check('publisher receives its own message once per matching subscription', () => {
    assert.deepEqual(got.map(m => m.context).sort(), ['interop', 'interop.news'])
    for (const m of got) {
      assert.equal(m.type, 'publish')
      assert.equal(m.topic, 'interop.news.uk')
      assert.deepEqual(m.message, message)
      assert.equal(m.timestamp, req.timestamp, "publisher's timestamp is carried")
      assert.equal(m.fromPeerServer, undefined)
    }
  })
  checkAck(await a.next('publish ack'), 'publish', 'interop.news.uk')
  checks.push('publish ack after deliveries')

  // Cross-client delivery through the wildcard; a large message (64-bit frame length).
  const big = 'x'.repeat(70_000)
  const req2 = a.request('publish', 'interop.uk.weather', big)
  const d = await b.next('wildcard delivery')
  check('wildcard delivery to another client', () => {
    assert.equal(d.type, 'publish')
    assert.equal(d.topic, 'interop.uk.weather')
    assert.equal(d.context, 'interop.*.weather')
    assert.equal(d.message, big)
    assert.equal(d.timestamp, req2.timestamp)
  })
  const own = await a.next('own delivery')
  assert.equal(own.context, 'interop')
  checkAck(await a.next('publish ack'), 'publish', 'interop.uk.weather')

  // An absent message arrives as null; a publish without timestamp gets server time.
  a.send({ type: 'publish', topic: 'interop' })
  const nul = await a.next('null delivery')
  check('absent message is null, server stamps the time', () => {
    assert.equal(nul.message, null)
    assert.match(nul.timestamp, JS_DATE)
  })
  checkAck(await a.next('publish ack'), 'publish', 'interop')

  // Unsubscribing the parent leaves the child.
  a.request('unsubscribe', 'interop')
  checkAck(await a.next('unsubscribe ack'), 'unsubscribe', 'interop')
  a.request('publish', 'interop.news.fr', 'after')
  const only = await a.next('child delivery')
  check('unsubscribe leaves the child subscription', () => {
    assert.equal(only.context, 'interop.news')
    assert.equal(only.message, 'after')
  })
  checkAck(await a.next('publish ack'), 'publish', 'interop.news.fr')

  // Extensions an original client never relies on, but can read.
  a.send({ type: 'publish', topic: 'bad..topic', id: 7 })
  const err = await a.next('error reply')
  check('error reply', () => {
    assert.equal(err.type, 'error')
    assert.equal(err.error, 'invalid_topic')
    assert.equal(err.action, 'publish')
    assert.equal(err.id, 7)
  })

  // Normal close, answered by the server.
  const closed = new Promise(resolve => a.ws.on('close', code => resolve(code)))
  a.ws.close(1000)
  assert.equal(await closed, 1000)
  b.ws.terminate()
  checks.push('closed 1000')
}

run().then(
  () => {
    console.log(JSON.stringify({ ok: true, checks }))
    process.exit(0)
  },
  err => {
    console.log(JSON.stringify({ ok: false, checks, error: String(err && err.stack || err) }))
    process.exit(1)
  }
)
