#!/usr/bin/env node
// Small timing probes for bench/run.sh. Each prints one JSON object on stdout.
// Every request is a new connection to 127.0.0.1 (`Connection: close`); the
// apps answer {"instance": NODE_APP_INSTANCE, "pid": pid}. A few request loops
// run side by side, each pausing PAUSE_MS between requests so the probe does
// not starve the processes it waits for on a small machine. Every probe gives
// up after its deadline and then reports `timeout: true`.
//
//   probe.js boot APP PORT                 spawn `node APP` (PORT=PORT), time until it answers, kill it
//   probe.js crash PORT PID KNOWN           SIGKILL PID, time until a pid not in KNOWN (comma-separated:
//                                           the manager's children) nor seen in a warm-up answers
//   probe.js until PORT N -- CMD ARGS...     run CMD, time until N distinct instances answer
//                                           (and when CMD returned)
//   probe.js pids PORT N                    wait until N distinct instances answer; print instance -> pid
'use strict';
const { spawn } = require('child_process');

const LOOPS = 4;
const PAUSE_MS = 2;
const DEADLINE_MS = 30000;

const { get, now, sleep } = require('./get');

// Run LOOPS request loops until `done(answer)` returns true or the deadline.
async function poll(port, done, deadlineMs = DEADLINE_MS) {
  const end = now() + deadlineMs;
  let finished = false;
  let requests = 0;
  let failures = 0;
  const loop = async () => {
    while (!finished && now() < end) {
      const a = await get(port);
      requests += 1;
      if (a === null) failures += 1;
      else if (done(a)) finished = true;
      if (!finished) await sleep(PAUSE_MS);
    }
  };
  await Promise.all(Array.from({ length: LOOPS }, loop));
  return { ok: finished, requests, failures };
}

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function boot(app, port) {
  const t0 = now();
  const child = spawn(process.execPath, [app], {
    env: { ...process.env, PORT: String(port), NODE_APP_INSTANCE: '0' },
    stdio: 'ignore',
  });
  let t = null;
  const r = await poll(port, () => {
    t = now();
    return true;
  });
  child.kill('SIGKILL');
  await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.once('exit', resolve)));
  out({ ms: r.ok ? t - t0 : null, timeout: !r.ok });
}

async function crash(port, pid, knownList) {
  const known = new Set([Number(pid), ...String(knownList || '').split(',').filter(Boolean).map(Number)]);
  // Warm-up: learn the pids answering now, so the first new one is the replacement.
  const t = now();
  while (now() - t < 300) {
    const a = await get(port);
    if (a) known.add(a.pid);
  }
  const t0 = now();
  process.kill(Number(pid), 'SIGKILL');
  let t1 = null;
  let newPid = null;
  const r = await poll(port, (a) => {
    if (known.has(a.pid)) return false;
    t1 = now();
    newPid = a.pid;
    return true;
  });
  out({ ms: r.ok ? t1 - t0 : null, timeout: !r.ok, killed: Number(pid), replacement: newPid, failures: r.failures });
}

async function until(port, n, cmd) {
  const seen = new Map();
  const t0 = now();
  let cmdMs = null;
  let cmdStatus = null;
  const child = spawn(cmd[0], cmd.slice(1), { stdio: 'ignore' });
  const exited = new Promise((resolve) =>
    child.once('exit', (code) => {
      cmdMs = now() - t0;
      cmdStatus = code;
      resolve();
    }),
  );
  let t1 = null;
  const r = await poll(port, (a) => {
    seen.set(String(a.instance), a.pid);
    if (seen.size < n) return false;
    t1 = now();
    return true;
  });
  await Promise.race([exited, sleep(DEADLINE_MS)]);
  out({ ms: r.ok ? t1 - t0 : null, timeout: !r.ok, command_ms: cmdMs, command_status: cmdStatus, instances: Object.fromEntries(seen) });
}

async function pids(port, n) {
  const seen = new Map();
  const r = await poll(port, (a) => {
    seen.set(String(a.instance), a.pid);
    return seen.size >= n;
  });
  out({ timeout: !r.ok, instances: Object.fromEntries(seen) });
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === 'boot') return boot(args[0], Number(args[1]));
  if (mode === 'crash') return crash(Number(args[0]), args[1], args[2]);
  if (mode === 'until') {
    const dash = args.indexOf('--');
    return until(Number(args[0]), Number(args[1]), args.slice(dash + 1));
  }
  if (mode === 'pids') return pids(Number(args[0]), Number(args[1]));
  console.error('usage: probe.js boot APP PORT | crash PORT PID KNOWN | until PORT N -- CMD... | pids PORT N');
  process.exit(2);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
