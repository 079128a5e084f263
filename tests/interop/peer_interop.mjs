// Peering interop: Node.js (npm `ws`, the library the original dwsps is built
// on) playing the ORIGINAL dwsps on either side of a peer link.
//
//   node peer_interop.mjs server [PORT]
//       A minimal original-style dwsps server: subscribe / unsubscribe /
//       publish with acks that echo no id, prefix topic matching with
//       `context`, `fromPeerServer` passed on to subscribers. It understands
//       no extension field (ids, origin, seq are ignored, never echoed).
//       Prints {"listening": PORT}, then {"request": {...}} for every request.
//   node peer_interop.mjs subscribe URL TOPIC COUNT
//       Subscribes like the original client; prints {"subscribed": TOPIC},
//       then {"delivery": {...}} per delivery; exits 0 after COUNT of them.
//   node peer_interop.mjs peer-publish URL TOPIC MESSAGE_JSON [TOKEN]
//       Acts as an original peer server's link: a plain client that sends one
//       {type, topic, message, timestamp, fromPeerServer: true}. With TOKEN it
//       presents `Authorization: Bearer TOKEN`. Prints {"reply": {...}}.
//
// Every line on stdout is one JSON object.

import WebSocket, { WebSocketServer } from 'ws'

const [mode, ...args] = process.argv.slice(2)
const print = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const fail = (err) => { print({ error: String(err) }); process.exit(1) }

function matches (subscription, topic) {
  const s = subscription.split('.')
  const t = topic.split('.')
  return s.length <= t.length && s.every((level, i) => level === t[i])
}

function server (port) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(port || 0) })
  const subscriptions = new Map() // ws -> Set(topic)
  wss.on('listening', () => print({ listening: wss.address().port }))
  wss.on('connection', (ws) => {
    subscriptions.set(ws, new Set())
    ws.on('close', () => subscriptions.delete(ws))
    ws.on('message', (data) => {
      let req
      try { req = JSON.parse(data.toString('utf8')) } catch { return } // the original just ignores junk
      print({ request: req })
      const ack = () => ws.send(JSON.stringify({
        type: 'ack', action: req.type, timestamp: new Date().toJSON(), topic: req.topic
      }))
      if (req.type === 'subscribe') {
        subscriptions.get(ws).add(req.topic)
        ack()
      } else if (req.type === 'unsubscribe') {
        subscriptions.get(ws).delete(req.topic)
        ack()
      } else if (req.type === 'publish') {
        for (const [client, topics] of subscriptions) {
          for (const context of topics) {
            if (!matches(context, req.topic)) continue
            const delivery = {
              type: 'publish',
              timestamp: req.timestamp || new Date().toJSON(),
              topic: req.topic,
              context,
              message: req.message
            }
            if (req.fromPeerServer) delivery.fromPeerServer = true
            client.send(JSON.stringify(delivery))
          }
        }
        // (An original server would forward to its own peers here unless
        // fromPeerServer is set; this one has none.)
        ack()
      }
    })
  })
  const stop = () => { wss.close(); process.exit(0) }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}

function subscribe (url, topic, count) {
  const ws = new WebSocket(url)
  let received = 0
  ws.on('error', fail)
  ws.on('open', () => {
    ws.send(JSON.stringify({ type: 'subscribe', topic, timestamp: new Date().toJSON() }))
  })
  ws.on('message', (data) => {
    const msg = JSON.parse(data.toString('utf8'))
    if (msg.type === 'ack' && msg.action === 'subscribe') {
      print({ subscribed: msg.topic })
    } else if (msg.type === 'publish') {
      print({ delivery: msg })
      received += 1
      if (received >= Number(count)) {
        ws.close()
        ws.on('close', () => process.exit(0))
      }
    }
  })
}

function peerPublish (url, topic, messageJson, token) {
  const options = token ? { headers: { Authorization: `Bearer ${token}` } } : {}
  const ws = new WebSocket(url, options)
  ws.on('error', fail)
  ws.on('open', () => {
    ws.send(JSON.stringify({
      type: 'publish',
      topic,
      message: JSON.parse(messageJson),
      timestamp: new Date().toJSON(),
      fromPeerServer: true
    }))
  })
  ws.on('message', (data) => {
    const reply = JSON.parse(data.toString('utf8'))
    if (reply.type === 'ack' || reply.type === 'error') {
      print({ reply })
      ws.close()
      ws.on('close', () => process.exit(0))
    }
  })
}

if (mode === 'server') server(args[0])
else if (mode === 'subscribe') subscribe(args[0], args[1], args[2])
else if (mode === 'peer-publish') peerPublish(args[0], args[1], args[2], args[3])
else fail(`unknown mode ${mode}`)
