// Measuring instruments of the benchmark harness, in Node's amqplib (a fast AMQP client, so the
// instrument is not what limits the figure). Driven by bench/nodetool.py; one JSON argument.
//
//   node amqp_tool.js publish '{"url":..,"exchange":..,"routingKey":..,"count":N,"size":500,"window":1000}'
//     Reference publisher for the broker ceiling: persistent, mandatory, publisher confirms with at
//     most `window` unconfirmed, a JSON body of exactly `size` bytes and the relay's properties and
//     headers. Prints one JSON line {published, seconds, rate} (first publish -> last confirm).
//
//     `routingKeys` (a list) instead of `routingKey`: message i goes with routingKeys[i % length].
//     `rate` (messages/s): message i is published no earlier than i / rate s after the first;
//     with `burst`, in groups of that many back to back (a writer's multi-row transactions).
//
//   node amqp_tool.js ack '{"url":..,"queues":[..],"prefetch":500,"batch":1}'
//     Trivial consumers: one per queue, manual ack of every delivery (what a worker that does
//     nothing would cost the broker); with `batch` > 1, one multiple ack per `batch`
//     deliveries or 10 ms. Prints "ready" once consuming; on SIGTERM/SIGINT prints one JSON
//     line {acked} and exits 0.
//
//   node amqp_tool.js consume '{"url":..,"queue":..,"out":"/path","prefetch":2000}'
//     Latency consumer: auto-ack, records per message the arrival time (epoch ms, sub-ms) and the
//     `commit_time` / `created_at` headers. Prints "ready" once consuming; on SIGTERM/SIGINT writes
//     tab-separated lines `arrival_ms<TAB>commit_time<TAB>created_at` to `out` and exits 0.
'use strict';

const amqp = require('amqplib');
const fs = require('fs');
const { performance } = require('perf_hooks');

const nowMs = () => performance.timeOrigin + performance.now();

function body(size, i) {
  const head = `{"deviceId": "dev-${i % 1000}", "userId": "u-${i % 97}", "pad": "`;
  const tail = '"}';
  const padLen = Math.max(0, size - head.length - tail.length);
  return Buffer.from(head + 'x'.repeat(padLen) + tail);
}

async function publish(opts) {
  const conn = await amqp.connect(opts.url);
  const ch = await conn.createConfirmChannel();
  const window = opts.window || 1000;
  const count = opts.count;
  const payload = body(opts.size || 500, 0);
  let inFlight = 0;
  let confirmed = 0;
  let nacked = 0;
  let wake = null;
  ch.on('return', () => { nacked += 1; });
  const started = nowMs();
  await new Promise((resolve, reject) => {
    ch.on('error', reject);
    const onConfirm = (err) => {
      inFlight -= 1;
      if (err) nacked += 1; else confirmed += 1;
      if (confirmed + nacked === count) resolve();
      if (wake && inFlight < window) { const w = wake; wake = null; w(); }
    };
    (async () => {
      for (let i = 0; i < count; i += 1) {
        if (opts.rate && i % (opts.burst || 1) === 0) {
          const due = started + (i * 1000) / opts.rate - nowMs();
          if (due > 1) await new Promise((r) => setTimeout(r, due));
        }
        if (inFlight >= window) await new Promise((r) => { wake = r; });
        inFlight += 1;
        const now = new Date();
        const key = opts.routingKeys ? opts.routingKeys[i % opts.routingKeys.length] : opts.routingKey;
        const ok = ch.publish(opts.exchange, key, payload, {
          persistent: true,
          mandatory: true,
          contentType: 'application/json',
          type: key,
          messageId: `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`,
          timestamp: Math.floor(now.getTime() / 1000),
          headers: {
            aggregate_type: 'device',
            aggregate_id: `dev-${i % 1000}`,
            commit_lsn: '0/16B3748',
            commit_time: now.toISOString(),
            created_at: now.toISOString(),
          },
        }, onConfirm);
        if (!ok) await new Promise((r) => ch.once('drain', r));
      }
    })().catch(reject);
  });
  const seconds = (nowMs() - started) / 1000;
  await ch.close();
  await conn.close();
  process.stdout.write(JSON.stringify({
    published: confirmed, nacked, seconds, rate: confirmed / seconds,
  }) + '\n');
}

async function consume(opts) {
  const conn = await amqp.connect(opts.url);
  const ch = await conn.createChannel();
  await ch.prefetch(opts.prefetch || 2000);
  const lines = [];
  await ch.consume(opts.queue, (msg) => {
    if (msg === null) return;
    const h = msg.properties.headers || {};
    lines.push(`${nowMs().toFixed(3)}\t${h.commit_time || ''}\t${h.created_at || ''}`);
  }, { noAck: true });
  let finished = false;
  const finish = async () => {
    if (finished) return;
    finished = true;
    fs.writeFileSync(opts.out, lines.join('\n') + (lines.length ? '\n' : ''));
    try { await conn.close(); } catch (e) { /* closing anyway */ }
    process.exit(0);
  };
  process.on('SIGTERM', finish);
  process.on('SIGINT', finish);
  process.stdout.write('ready\n');
}

async function ack(opts) {
  const conn = await amqp.connect(opts.url);
  const ch = await conn.createChannel();
  let acked = 0;
  // `batch` > 1: one multiple ack per `batch` deliveries or 10 ms, whichever comes first
  // (as the workers ack a batch), instead of an ack per delivery.
  const batch = opts.batch || 1;
  let last = null;
  let pending = 0;
  let timer = null;
  const flush = () => {
    if (timer) { clearTimeout(timer); timer = null; }
    if (last === null) return;
    ch.ack(last, true);
    acked += pending;
    last = null;
    pending = 0;
  };
  for (const queue of opts.queues) {
    await ch.prefetch(opts.prefetch || 500);
    await ch.consume(queue, (msg) => {
      if (msg === null) return;
      if (batch <= 1) {
        ch.ack(msg);
        acked += 1;
        return;
      }
      last = msg;
      pending += 1;
      if (pending >= batch) flush();
      else if (!timer) timer = setTimeout(flush, 10);
    }, { noAck: false });
  }
  let finished = false;
  const finish = async () => {
    if (finished) return;
    finished = true;
    flush();
    process.stdout.write(JSON.stringify({ acked }) + '\n');
    try { await conn.close(); } catch (e) { /* closing anyway */ }
    process.exit(0);
  };
  process.on('SIGTERM', finish);
  process.on('SIGINT', finish);
  process.stdout.write('ready\n');
}

const [mode, arg] = process.argv.slice(2);
const opts = JSON.parse(arg || '{}');
const modes = { publish, consume, ack };
const run = modes[mode] || null;
if (run === null) {
  process.stderr.write('usage: node amqp_tool.js publish|consume|ack JSON\n');
  process.exit(2);
}
run(opts).catch((err) => {
  process.stderr.write(`amqp_tool ${mode}: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
