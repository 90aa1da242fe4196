#!/usr/bin/env node
// What clients see while a command replaces a process manager's own program
// (bench/reexec.sh: `nodeherd reexec`, `pm2 update`). Prints one JSON object.
//
//   outage.js PORT N -- CMD ARGS...
//
// Learns which worker pids answer (300 ms), runs CMD, and meanwhile keeps 4
// request loops going (a new connection per request, `Connection: close`,
// 2 ms pause, 2 s timeout per request), as bench/lib/probe.js does. It stops
// once CMD has exited and, after that, N distinct instances have answered
// (at least 300 ms after the exit), or after 30 s. Times are ms from the call:
//
//   command_ms     CMD returned;           command_status: its exit status
//   reported_ms    the "answered N ms after the request" figure CMD printed, if any
//   failures       probe requests that got no 200 (refused, reset, timed out)
//   first_failure_ms  when the first of them failed (null: none failed)
//   back_ms        the first answer after the last failed request (null: none failed)
//   max_gap_ms     the longest time without any answer (from the call to the end)
//   max_gap_from_ms   when that time began (the answer before it)
//   all_new_ms     N distinct instances answered from pids not seen before the call (null: never)
//   pids_before, pids_after   instance -> pid, before the call and after CMD returned
'use strict';
const { spawn } = require('child_process');

const LOOPS = 4;
const PAUSE_MS = 2;
const DEADLINE_MS = 30000;
const SETTLE_MS = 300;

const { get, now, sleep } = require('./get');

async function main() {
  const args = process.argv.slice(2);
  const dash = args.indexOf('--');
  if (args.length < 4 || dash !== 2) {
    console.error('usage: outage.js PORT N -- CMD ARGS...');
    process.exit(2);
  }
  const port = Number(args[0]);
  const n = Number(args[1]);
  const cmd = args.slice(dash + 1);

  const before = new Map();
  const warm = now();
  while (now() - warm < 300) {
    const a = await get(port);
    if (a) before.set(String(a.instance), a.pid);
  }
  const oldPids = new Set(before.values());

  const t0 = now();
  let exitAt = null;
  let status = null;
  let stderr = '';
  const child = spawn(cmd[0], cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => (stderr += d));
  child.once('exit', (code, signal) => {
    exitAt = now();
    status = code === null ? `signal ${signal}` : code;
  });

  const answers = []; // end times of successful requests
  const after = new Map(); // instance -> pid, requests started after CMD returned
  const fresh = new Map(); // instance -> pid, pids not seen before the call
  let failures = 0;
  let firstFailure = null;
  let lastFailure = null;
  let allNew = null;
  let finished = false;
  const end = t0 + DEADLINE_MS;
  const loop = async () => {
    while (!finished && now() < end) {
      const started = now();
      const a = await get(port);
      const t = now();
      if (a === null) {
        failures += 1;
        if (firstFailure === null) firstFailure = t;
        lastFailure = t;
      } else {
        answers.push(t);
        if (!oldPids.has(a.pid)) {
          fresh.set(String(a.instance), a.pid);
          if (allNew === null && fresh.size >= n) allNew = t;
        }
        if (exitAt !== null && started >= exitAt) after.set(String(a.instance), a.pid);
      }
      if (exitAt !== null && t - exitAt >= SETTLE_MS && after.size >= n) finished = true;
      if (!finished) await sleep(PAUSE_MS);
    }
  };
  await Promise.all(Array.from({ length: LOOPS }, loop));
  const tEnd = now();
  if (exitAt === null) {
    child.kill('SIGKILL');
    await new Promise((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve() : child.once('exit', resolve)));
  }

  answers.sort((a, b) => a - b);
  let gap = 0;
  let gapFrom = t0;
  let prev = t0;
  for (const t of [...answers, tEnd]) {
    if (t - prev > gap) {
      gap = t - prev;
      gapFrom = prev;
    }
    prev = t;
  }
  const back = lastFailure === null ? null : answers.find((t) => t > lastFailure);
  const reported = /answered (\d+) ms after the request/.exec(stderr);
  const r = (x) => (x === null || x === undefined ? null : Math.round(x - t0));
  process.stdout.write(
    JSON.stringify({
      command_ms: r(exitAt),
      command_status: status,
      reported_ms: reported ? Number(reported[1]) : null,
      requests: answers.length + failures,
      failures,
      first_failure_ms: r(firstFailure),
      back_ms: lastFailure === null ? null : back === undefined ? null : r(back),
      max_gap_ms: Math.round(gap),
      max_gap_from_ms: r(gapFrom),
      all_new_ms: r(allNew),
      timeout: !finished,
      pids_before: Object.fromEntries(before),
      pids_after: Object.fromEntries(after),
      stderr_tail: stderr.trim().split('\n').slice(-1)[0].slice(0, 300),
    }) + '\n',
  );
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
