#!/usr/bin/env node
// Turns a run directory of bench/reexec.sh into a Markdown report (stdout).
//   reexec-report.js RUN_DIR
'use strict';
const fs = require('fs');
const path = require('path');

const run = process.argv[2];
if (!run) {
  console.error('usage: reexec-report.js RUN_DIR');
  process.exit(2);
}
const meta = JSON.parse(fs.readFileSync(path.join(run, 'meta.json'), 'utf8'));
const rows = fs
  .readFileSync(path.join(run, 'results.jsonl'), 'utf8')
  .split('\n')
  .filter(Boolean)
  .map((l) => JSON.parse(l));
const st = meta.settings;
const of = (kind) => rows.filter((r) => r.kind === kind);
const one = (kind) => of(kind)[0];

const sorted = (xs) => xs.filter((x) => x !== null && x !== undefined).sort((a, b) => a - b);
function median(xs) {
  const s = sorted(xs);
  if (!s.length) return null;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}
function pct(xs, p) {
  const s = sorted(xs);
  if (!s.length) return null;
  return s[Math.max(0, Math.ceil(s.length * p) - 1)];
}
const f0 = (x) => (x === null ? '–' : String(Math.round(x)));
const f1 = (x) => (x === null ? '–' : x.toFixed(1));
const mib = (kib) => (kib / 1024).toFixed(2);
// "median, p90 (min–max)", ms
function dist(xs) {
  const s = sorted(xs);
  if (!s.length) return '–';
  return `${f0(median(s))}, p90 ${f0(pct(s, 0.9))} (${f0(s[0])}–${f0(s[s.length - 1])})`;
}

// Failed requests in one oha result, as bench/lib/report.js counts them:
// every error except the deadline cut-off, plus every non-2xx answer.
const DEADLINE = 'aborted due to deadline';
function failures(o) {
  const errors = o.errorDistribution || {};
  let failed = 0;
  let timeouts = 0;
  const kinds = {};
  for (const [k, n] of Object.entries(errors)) {
    if (k === DEADLINE) continue;
    failed += n;
    if (/timeout|timed out/i.test(k)) timeouts += n;
    kinds[k] = (kinds[k] || 0) + n;
  }
  for (const [code, n] of Object.entries(o.statusCodeDistribution || {})) {
    if (!/^2/.test(code)) {
      failed += n;
      kinds[`HTTP ${code}`] = (kinds[`HTTP ${code}`] || 0) + n;
    }
  }
  const ok = Object.entries(o.statusCodeDistribution || {}).reduce((a, [c, n]) => a + (/^2/.test(c) ? n : 0), 0);
  return { failed, timeouts, kinds, ok };
}
function oha(file) {
  try {
    return failures(JSON.parse(fs.readFileSync(file, 'utf8')));
  } catch (e) {
    return { failed: null, timeouts: null, kinds: { [`unreadable oha output: ${e.message}`]: 1 }, ok: 0 };
  }
}

const NAME = { nodeherd: 'nodeherd reexec', pm2: `pm2 update (PM2 ${meta.pm2})` };
const swaps = of('swap');
const ohas = of('oha').map((r) => ({ ...r, f: oha(r.oha) }));
const sameSet = (a, b) => a === b && a !== '';
// Every pid that answered after the swap was a worker before it.
const kept = (r) => {
  const was = new Set(r.children_before.split(',').filter(Boolean).map(Number));
  const now = Object.values(r.probe.pids_after);
  return now.length > 0 && now.every((pid) => was.has(pid));
};

const out = [];
const p = (...lines) => out.push(...(lines.length ? lines : ['']));

const load = (l) => l.map((x) => x.toFixed(2)).join(' ');
p(`- Date: ${meta.date.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')}; measuring took ${(meta.seconds / 60).toFixed(1)} min.`);
p(`- Machine: ${meta.nproc} CPUs, ${meta.cpu.split(' ').slice(0, 2).join(' ')}, ${meta.mem_gib} GiB, Linux ${meta.kernel}; load average ${load(meta.loadavg_start)} at start, ${load(meta.loadavg_end)} at end.`);
p(`- Versions: node ${meta.node}, PM2 ${meta.pm2}, ${meta.oha}, ${meta.nodeherd} (commit ${meta.commit}${meta.dirty ? ', with uncommitted changes to src/' : ''}).`);
p(`- Command: \`${meta.command}\`${meta.nice ? `, at nice ${meta.nice}` : ''}. ${st.workers} workers of bench/apps/hello.js for each contender; nodeherd on a private dbus-daemon, PM2 with a private PM2_HOME.`);
p();

p(`#### Under load: failed requests`);
p();
p(`\`oha -c ${st.conns} -t ${st.client_timeout}s\`, keep-alive off (\`--disable-keepalive\`) or on; per round and setting one oha run per contender with ${st.reexecs} re-execs or ${st.updates} \`pm2 update\`s in it (${st.lead} s of load before the first, ${st.gap} s between, ${st.client_timeout + 1} s after the last before oha is stopped). Failed = oha errors except "${DEADLINE}" (what is open when oha is stopped) plus non-2xx answers; hung = the failed ones with no answer within ${st.client_timeout} s.`);
p();
p('| contender | keep-alive | oha runs | swaps | failed, all runs | failed per swap | hung | answered per run, median | SYNs dropped (ListenDrops), all runs | kinds of failure |');
p('|---|---|---|---|---|---|---|---|---|---|');
for (const c of ['nodeherd', 'pm2']) {
  for (const ka of ['off', 'on']) {
    const rs = ohas.filter((r) => r.contender === c && r.ka === ka);
    if (!rs.length) continue;
    const n = rs.reduce((a, r) => a + r.swaps, 0);
    const failed = rs.reduce((a, r) => a + (r.f.failed ?? 0), 0);
    const hung = rs.reduce((a, r) => a + (r.f.timeouts ?? 0), 0);
    const kinds = {};
    for (const r of rs) for (const [k, v] of Object.entries(r.f.kinds)) kinds[k] = (kinds[k] || 0) + v;
    const kindText = Object.entries(kinds)
      .sort((a, b) => b[1] - a[1])
      .map(([k, v]) => `${v}× ${k}`)
      .join('; ');
    const drops = rs.reduce((a, r) => a + (r.listen_drops ?? 0), 0);
    p(`| ${NAME[c]} | ${ka} | ${rs.length} | ${n} | ${failed} | ${(failed / n).toFixed(1)} | ${hung} | ${f0(median(rs.map((r) => r.f.ok)))} | ${drops} | ${kindText || '–'} |`);
  }
}
p();

p(`#### Under load: how long, and what a client sees`);
p();
p(`Every swap is wrapped by \`bench/lib/outage.js\`: 4 request loops (a new connection per request, 2 ms pause, 2 s timeout) beside oha, from 300 ms before the call until the command has returned and every instance has answered again; after each swap the same probe runs once around a 200 ms sleep with nothing swapped (control: what the load alone does to the probe). ms from the call, median, p90 (min–max) over all swaps of both keep-alive settings.`);
p();
const sw = (c) => swaps.filter((r) => r.contender === c).map((r) => r.probe);
const nh = sw('nodeherd');
const pm = sw('pm2');
p(`| measure | ${NAME.nodeherd} | ${NAME.pm2} | nodeherd / PM2 (medians) |`);
p('|---|---|---|---|');
const ratio = (a, b) => (a === null || b === null || b === 0 ? '–' : (a / b).toFixed(3));
p(`| swaps | ${nh.length} | ${pm.length} | |`);
p(`| call → the new manager answers (nodeherd: its own figure, the D-Bus \`Reexecs\` property one higher; PM2: \`pm2 update\` returned) | ${dist(nh.map((x) => x.reported_ms))} | ${dist(pm.map((x) => x.command_ms))} | ${ratio(median(nh.map((x) => x.reported_ms)), median(pm.map((x) => x.command_ms)))} |`);
p(`| call → the command returned | ${dist(nh.map((x) => x.command_ms))} | ${dist(pm.map((x) => x.command_ms))} | ${ratio(median(nh.map((x) => x.command_ms)), median(pm.map((x) => x.command_ms)))} |`);
p(`| probe requests that failed, all swaps | ${nh.reduce((a, x) => a + x.failures, 0)} of ${nh.reduce((a, x) => a + x.requests, 0)} | ${pm.reduce((a, x) => a + x.failures, 0)} of ${pm.reduce((a, x) => a + x.requests, 0)} | |`);
p(`| swaps in which a probe request failed | ${nh.filter((x) => x.failures > 0).length} | ${pm.filter((x) => x.failures > 0).length} | |`);
p(`| call → the app answers again (first answer after the last failed request; "–" when none failed) | ${dist(nh.map((x) => x.back_ms))} | ${dist(pm.map((x) => x.back_ms))} | |`);
p(`| call → the first failed request | ${dist(nh.map((x) => x.first_failure_ms))} | ${dist(pm.map((x) => x.first_failure_ms))} | |`);
p(`| longest time without any answer | ${dist(nh.map((x) => x.max_gap_ms))} | ${dist(pm.map((x) => x.max_gap_ms))} | ${ratio(median(nh.map((x) => x.max_gap_ms)), median(pm.map((x) => x.max_gap_ms)))} |`);
const ctl = (c) => of('control').filter((r) => r.contender === c).map((r) => r.probe);
p(`| control, no swap: longest time without any answer | ${dist(ctl('nodeherd').map((x) => x.max_gap_ms))} | ${dist(ctl('pm2').map((x) => x.max_gap_ms))} | |`);
p(`| control, no swap: probe requests that failed | ${ctl('nodeherd').reduce((a, x) => a + x.failures, 0)} of ${ctl('nodeherd').reduce((a, x) => a + x.requests, 0)} | ${ctl('pm2').reduce((a, x) => a + x.failures, 0)} of ${ctl('pm2').reduce((a, x) => a + x.requests, 0)} | |`);
p(`| call → all ${st.workers} instances answer from new pids | ${nh.every((x) => x.all_new_ms === null) ? 'never (pids kept)' : dist(nh.map((x) => x.all_new_ms))} | ${pm.every((x) => x.all_new_ms === null) ? 'never (pids kept)' : dist(pm.map((x) => x.all_new_ms))} | |`);
p(`| probe timed out (30 s) | ${nh.filter((x) => x.timeout).length} | ${pm.filter((x) => x.timeout).length} | |`);
for (const ka of ['off', 'on']) {
  const a = swaps.filter((r) => r.contender === 'nodeherd' && r.ka === ka).map((r) => r.probe.reported_ms);
  const b = swaps.filter((r) => r.contender === 'pm2' && r.ka === ka).map((r) => r.probe.command_ms);
  if (a.length || b.length) p(`| call → the new manager answers, keep-alive ${ka} only | ${dist(a)} | ${dist(b)} | ${ratio(median(a), median(b))} |`);
}
p();
const long = (rs) =>
  rs
    .filter((r) => r.probe.max_gap_ms > 300)
    .map((r) => `${r.probe.max_gap_ms} ms from ${r.probe.max_gap_from_ms ?? '?'} ms (keep-alive ${r.ka}; the command returned at ${r.probe.command_ms} ms${r.probe.reported_ms !== null ? `, its own figure ${r.probe.reported_ms} ms after its request` : ''})`);
for (const [c, kind] of [['nodeherd', 'swap'], ['nodeherd', 'control'], ['pm2', 'control']]) {
  const l = long(of(kind).filter((r) => r.contender === c));
  if (l.length) p(`${kind === 'swap' ? NAME[c] : `${NAME[c]}, control`}: probe stalls over 300 ms: ${l.join('; ')}.`, '');
}

// Worker pids.
const nhSw = swaps.filter((r) => r.contender === 'nodeherd');
const pmSw = swaps.filter((r) => r.contender === 'pm2');
const ls = one('load_start');
const le = one('load_end');
p(`#### Worker pids`);
p();
p(`- nodeherd: the manager's children were the same set before and after ${nhSw.filter((r) => sameSet(r.children_before, r.children_after)).length} of ${nhSw.length} re-execs under load, and every pid that answered the probe after the re-exec was one of the workers before it in ${nhSw.filter(kept).length} of ${nhSw.length}; over the whole load phase: ${ls.children} before, ${le.children} after (${sameSet(ls.children, le.children) ? 'the same' : '**different**'}); manager pid ${ls.pid} → ${le.pid}, start time ${ls.start} → ${le.start} (${ls.pid === le.pid && ls.start === le.start ? 'the same process' : '**not the same process**'}).`);
p(`- PM2: the daemon's pid changed in ${pmSw.filter((r) => r.manager !== r.manager_after).length} of ${pmSw.length} updates; the pids answering after the update were all workers from before it in ${pmSw.filter(kept).length} of ${pmSw.length} (e.g. ${pmSw.length ? `${pmSw[0].children_before} → ${pmSw[0].children_after}` : '–'}).`);
p();

// Many in a row.
const rb = one('row_before');
const ra = one('row_after');
const row = of('row');
const sa = one('signal_after');
const sig = of('signal');
if (rb && ra) {
  p(`#### ${row.length} re-execs in a row (a fresh manager, ${st.workers} workers, no load)`);
  p();
  p(`Warmed up (1 s of \`oha -c 16\`), 3 s idle, then \`nodeherd reexec\` ${row.length} times one after another (each waits for the new manager), 3 s idle; then ${sig.length} more by \`kill -USR2\` (no client; each waited for by polling the \`Reexecs\` property with busctl every 10 ms).`);
  p();
  p('| | before | after the re-execs | after the SIGUSR2s too |');
  p('|---|---|---|---|');
  const c3 = (f) => `| ${f[0]} | ${f[1](rb)} | ${f[1](ra)} | ${sa ? f[1](sa) : '–'} |`;
  p(c3(['VmRSS, KiB (MiB)', (r) => `${r.vmrss_kib} (${mib(r.vmrss_kib)})`]));
  p(c3(['RssAnon / RssFile, KiB', (r) => `${r.rss_anon_kib} / ${r.rss_file_kib}`]));
  p(c3(['open fds', (r) => String(r.fds)]));
  p(c3(['fds by kind', (r) => Object.entries(r.fd_kinds).map(([k, v]) => `${k} ${v}`).join(', ')]));
  p(c3(['worker pids', (r) => r.children]));
  p(c3(['manager pid (start time)', (r) => `${r.pid} (${r.start})`]));
  p(c3(['`Reexecs` property', (r) => String(r.reexecs)]));
  p();
  const trace = of('row_trace');
  p(`Every 25 re-execs: VmRSS ${[rb, ...trace].map((r) => mib(r.vmrss_kib)).join(' → ')} MiB; open fds ${[rb, ...trace].map((r) => r.fds).join(' → ')}.`);
  p(`Failed re-execs: ${row.filter((r) => r.status !== 0).length} of ${row.length}. Call → the new manager answers (its own figure), idle: ${dist(row.map((r) => r.reported_ms))} ms; the command's wall time: ${dist(row.map((r) => r.command_ms))} ms.`);
  if (sig.length) p(`SIGUSR2: ${sig.filter((r) => r.ms !== null).length} of ${sig.length} came back; signal → \`Reexecs\` one higher: ${dist(sig.map((r) => r.ms))} ms (includes starting busctl for every poll).`);
  p();
}

// What the managers logged.
const logs = fs.existsSync(path.join(run, 'logs')) ? fs.readdirSync(path.join(run, 'logs')).filter((f) => f.startsWith('nodeherd-')) : [];
for (const f of logs) {
  const lines = fs.readFileSync(path.join(run, 'logs', f), 'utf8').split('\n');
  const took = lines.map((l) => /re-executed in (\d+) ms/.exec(l)).filter(Boolean).map((m) => Number(m[1]));
  // Up to the bench's own stop of the manager.
  const stop = lines.findIndex((l) => /stopping \d+ worker/.test(l));
  const odd = (stop < 0 ? lines : lines.slice(0, stop)).filter((l) =>
    /refused|failed|error|warn|exited|killed|restart|stopped|crash/i.test(l.replace('none restarted', '')),
  );
  p(`- ${f}: ${took.length} "re-executed in N ms" lines (the exec to the new program running, by the manager's monotonic clock: ${dist(took)} ms); ${odd.length} line(s) before the bench stopped it about a refusal, failure, error, warning, restart or exit${odd.length ? ':' : '.'}`);
  for (const l of odd.slice(0, 10)) p(`  \`${l.trim().slice(0, 200)}\``);
}
process.stdout.write(out.join('\n') + '\n');
