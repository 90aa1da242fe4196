'use strict';
// nodeherd's preload, loaded into every Node worker from a sealed memfd the
// worker inherits (src/worker/preload.rs: a `--import` bootstrap runs this
// file as a CommonJS function with `require` and `__filename`).
//
// It does four things for an unmodified app, in the worker process only:
// 1. Points the app's listen() calls at the sockets the manager handed over
//    at fd 3.., by this rule: a listen whose port (or path) matches an
//    inherited socket, or whose port or path equals a socket's name
//    (FileDescriptorName=), takes that socket; otherwise the first listen of
//    that kind (TCP, UDP, unix) in this process takes the only inherited
//    socket of that kind, and with no TCP socket handed over, the first TCP
//    listen takes the only unix one (a unit's default socket for a proxy).
//    Every other TCP or unix listen is shared across
//    the workers as under PM2's cluster mode: the manager binds the address
//    on the first worker's request, with that worker's rights (src/shared.rs),
//    keeps it while workers ask for it, and hands the same socket to each
//    worker that asks, over the IPC channel (Node's own handle passing).
//    UDP: only an explicit bind() is
//    mapped; the implicit bind of a client's send()/connect() stays a plain
//    ephemeral socket.
// 2. Tells the manager when the worker listens on a handed-over socket (its
//    readiness, unless the app uses `wait_ready` and sends 'ready' itself).
// 3. Gives apps that install no SIGINT handler (or no 'shutdown' message
//    handler) a graceful drain on stop, for every kind of connection:
//    HTTP/1 keep-alive, HTTP/2 sessions (GOAWAY, streams finish), upgraded
//    connections (WebSockets) and raw `net` connections, all within
//    kill_timeout. An app with its own handler keeps its own behaviour.
// 4. Keeps keep-alive connections evenly spread: it reports how many the
//    worker's HTTP servers hold, and when the manager says that is more than
//    this worker's fair share, answers the next request on the surplus with
//    `Connection: close` so that those clients reconnect, most of them to
//    workers with fewer.
// 5. Stays out of the app's own child processes (fork, spawn of node,
//    cluster.fork, worker threads): they never load it and see no nodeherd
//    variable; LISTEN_PID names the worker, so a child that reads
//    LISTEN_FDS ignores them, as sd_listen_fds() does.
// 6. Starts a helper thread with an inspector session on the main thread,
//    idle until the manager asks on its own channel: the stack of a stuck
//    event loop (hang autopsy), or, out of rotation, a heap snapshot, a CPU
//    profile or a stack (`nodeherd diagnose`).
(() => {
  const env = process.env;

  // Never follow the app into the processes it starts: not through
  // NODE_OPTIONS, not through the execArgv that fork() and cluster.fork()
  // pass on. The bootstrap is the `--import` of a data: URL naming the
  // preload's memfd.
  const isBoot = (w) => typeof w === 'string' && w.startsWith('data:text/javascript,') && w.includes('nodeherd-preload');
  const withoutSelf = (words) =>
    words.filter(
      (w, i, all) =>
        !(isBoot(w) || (w === '--import' && isBoot(all[i + 1])) || (w.startsWith('--import=') && isBoot(w.slice(9)))),
    );
  if (env.NODE_OPTIONS) env.NODE_OPTIONS = withoutSelf(env.NODE_OPTIONS.split(/\s+/)).join(' ');
  if (Array.isArray(process.execArgv)) process.execArgv = withoutSelf(process.execArgv);

  // Only the worker itself: not a worker thread, not a child that got here
  // some other way (LISTEN_PID names the process the sockets are for).
  let mainThread = true;
  try {
    mainThread = require('worker_threads').isMainThread;
  } catch (_) {
    // no worker_threads: nothing to check
  }
  if (!mainThread || env.LISTEN_PID !== String(process.pid)) return;

  const net = require('net');
  const dgram = require('dgram');
  const sockets = (env.NODEHERD_SOCKETS || '')
    .split(',')
    .filter(Boolean)
    .map((desc, i) => {
      const [kind, address, port, name] = desc.split('|');
      return { fd: 3 + i, kind, address, port: port ? Number(port) : null, name, claimed: false };
    });
  const killTimeout = Number(env.NODEHERD_KILL_TIMEOUT_MS) || 1600;
  const heartbeat = Number(env.NODEHERD_HEARTBEAT_MS) || 1000;
  for (const k of ['NODEHERD_SOCKETS', 'NODEHERD_APP', 'NODEHERD_KILL_TIMEOUT_MS', 'NODEHERD_HEARTBEAT_MS']) delete env[k];

  const channel = typeof process.send === 'function';
  const tell = (msg) => {
    if (channel && process.connected) {
      try {
        process.send(msg);
      } catch (_) {
        // The manager is gone; parent-death will end us.
      }
    }
  };

  // Which inherited socket a listen takes (see the rule above), or null.
  function pick(kind, port, path) {
    const ofKind = sockets.filter((s) => s.kind === kind);
    const want = path !== undefined ? String(path) : port ? String(port) : null;
    const match = ofKind.find(
      (s) => (port && s.port === Number(port)) || (want !== null && (s.name === want || s.address === want)),
    );
    let chosen = match || (ofKind.length === 1 && !ofKind[0].claimed ? ofKind[0] : null);
    // A port with no TCP socket handed over at all takes the only unix
    // socket: the unit's default (/run/nodeherd/APP.sock, for a proxy) is
    // where an app that listens on a port is meant to serve.
    if (!chosen && kind === 'tcp' && ofKind.length === 0) {
      const unix = sockets.filter((s) => s.kind === 'unix');
      if (unix.length === 1 && !unix[0].claimed) chosen = unix[0];
    }
    if (chosen) chosen.claimed = true;
    return chosen;
  }

  // --- request outcomes -----------------------------------------------------
  // Every response the app's HTTP servers here finish (http, https, http2's
  // compatibility API: Express, Fastify, Koa and Nest all end in one), by
  // status class, with its latency from the request to 'finish' in fixed
  // buckets; and uncaught exceptions and unhandled rejections. Cumulative,
  // sent with each heartbeat. Per response: one number in a symbol
  // property and a few integer increments; no closure, listener or array
  // (HTTP/1 responses end through ServerResponse's own `_finish`, patched
  // once; HTTP/2's compatibility responses get one shared 'finish'
  // listener). A response the client abandoned before it finished is not
  // counted.
  const BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];
  const classes = [0, 0, 0, 0, 0];
  const buckets = BUCKETS_MS.map(() => 0).concat([0]);
  let sumUs = 0;
  let exceptions = 0;
  let rejections = 0;
  const clock = globalThis.performance || require('perf_hooks').performance;
  const startedAt = Symbol('nodeherd: when the request came');
  function onFinish() {
    const cls = (this.statusCode / 100) | 0;
    if (cls < 1 || cls > 5) return;
    const ms = clock.now() - this[startedAt];
    this[startedAt] = undefined;
    classes[cls - 1] += 1;
    let i = 0;
    while (i < BUCKETS_MS.length && ms > BUCKETS_MS[i]) i += 1;
    buckets[i] += 1;
    sumUs += Math.round(ms * 1000);
  }
  const ServerResponse = require('http').ServerResponse;
  const ownFinish = ServerResponse.prototype._finish;
  const viaFinish = typeof ownFinish === 'function';
  if (viaFinish) {
    ServerResponse.prototype._finish = function () {
      if (this[startedAt] !== undefined) onFinish.call(this);
      return ownFinish.apply(this, arguments);
    };
  }
  function countResponse(res) {
    if (!res || res[startedAt] !== undefined) return;
    res[startedAt] = clock.now();
    if (!viaFinish || !(res instanceof ServerResponse)) res.on('finish', onFinish);
  }
  // A monitor sees an uncaught exception without handling it: Node's own
  // behaviour (print and exit, or the app's handler) is unchanged. An
  // unhandled rejection is seen where Node announces it (a listener of our
  // own would stop Node from throwing it); one that Node then throws as an
  // uncaught exception is already counted as a rejection.
  process.on('uncaughtExceptionMonitor', (_err, origin) => {
    if (origin !== 'unhandledRejection') exceptions += 1;
  });
  const processEmit = process.emit;
  process.emit = function (name) {
    if (name === 'unhandledRejection') rejections += 1;
    return processEmit.apply(this, arguments);
  };
  const outcomes = () => ({ c: classes, b: buckets, s: sumUs, x: exceptions, r: rejections });

  // --- heartbeat ------------------------------------------------------------
  // A beat each interval, with the event loop's longest delay since the last
  // one (perf_hooks, cheap: a 20 ms resolution timer in libuv). A stuck loop
  // sends none: the manager replaces the worker (max_event_loop_delay).
  if (channel) {
    let delay = null;
    try {
      delay = require('perf_hooks').monitorEventLoopDelay({ resolution: 20 });
      delay.enable();
    } catch (_) {
      // no perf_hooks: beats without a delay figure
    }
    // The share of the interval the loop was busy (event-loop utilization),
    // for autoscaling: a delta of perf_hooks' running totals.
    let perf = null;
    let lastElu = null;
    try {
      perf = require('perf_hooks').performance;
      lastElu = perf.eventLoopUtilization();
    } catch (_) {
      // no eventLoopUtilization: beats without it
    }
    const beat = setInterval(() => {
      let elu;
      if (lastElu) {
        const now = perf.eventLoopUtilization();
        elu = perf.eventLoopUtilization(now, lastElu).utilization;
        lastElu = now;
      }
      tell({ nodeherd: 'beat', delay_ms: delay ? delay.max / 1e6 : 0, elu, out: outcomes() });
      // Still above its share (the connections it closed came back here):
      // say so again, and the manager answers with the surplus to close.
      if (open > shareMax) {
        reported = -1;
        reportSoon();
      }
      if (delay) delay.reset();
    }, heartbeat);
    beat.unref();
    // One at once: the manager knows this worker beats before it is ready.
    tell({ nodeherd: 'beat', delay_ms: 0 });
  }

  // --- the helper thread ----------------------------------------------------
  // A stuck loop reads no IPC channel, so the manager asks for the stack on
  // a channel of its own (NODEHERD_HELPER_FD), read by a worker thread that
  // holds an inspector session on this thread: Debugger.pause interrupts
  // even `while (true) {}`, and the paused event carries the call frames.
  // Started now, while this thread still runs; idle (blocked in its own
  // event loop) until asked, and unref'd: it never keeps the app alive.
  const helperFd = Number(env.NODEHERD_HELPER_FD);
  delete env.NODEHERD_HELPER_FD;
  if (Number.isInteger(helperFd) && helperFd > 2) startHelper(helperFd);
  function startHelper(fd) {
    let Worker;
    try {
      Worker = require('worker_threads').Worker;
      require('inspector');
    } catch (_) {
      return; // no worker threads or no inspector in this build: no stacks
    }
    const source = `
      const { workerData, parentPort } = require('worker_threads');
      const inspector = require('inspector');
      const net = require('net');
      const MAX_FRAMES = 64, MAX_TEXT = 256, CHUNK = 1 << 20;
      const cut = (s) => String(s == null ? '' : s).slice(0, MAX_TEXT);
      const sock = new net.Socket({ fd: workerData.fd, readable: true, writable: true });
      sock.on('error', () => {});
      const send = (doc) => sock.write(JSON.stringify(doc) + '\\n');
      let session = null;
      const urls = new Map();
      function ensure() {
        if (!session) {
          session = new inspector.Session();
          session.connectToMainThread();
          session.on('Debugger.scriptParsed', (m) => urls.set(m.params.scriptId, m.params.url));
        }
        return session;
      }
      let busy = false;
      // Pause the main thread, take its frames, resume it.
      function takeStack(done) {
        const s = ensure();
        s.once('Debugger.paused', (m) => {
          const frames = [];
          const add = (f) => {
            if (frames.length >= MAX_FRAMES) return;
            const loc = f.location || f;
            frames.push({ f: cut(f.functionName), u: cut(f.url || urls.get(loc.scriptId) || '?'), l: loc.lineNumber + 1, c: loc.columnNumber + 1 });
          };
          for (const f of m.params.callFrames || []) add(f);
          for (let a = m.params.asyncStackTrace; a && frames.length < MAX_FRAMES; a = a.parent) {
            frames.push({ async: cut(a.description || 'async') });
            for (const f of a.callFrames || []) add(f);
          }
          s.post('Debugger.resume', () => s.post('Debugger.disable'));
          done(null, frames);
        });
        s.post('Debugger.enable', (err) => {
          if (err) return done(err);
          s.post('Debugger.setAsyncCallStackDepth', { maxDepth: 16 }, () =>
            s.post('Debugger.pause', (e) => e && done(e)));
        });
      }
      function stack(id) {
        if (busy || pending) return send({ id, error: 'a diagnosis is running' });
        busy = true;
        takeStack((err, frames) => {
          busy = false;
          send(err ? { id, error: cut(err.message) } : { id, frames });
        });
      }
      // Diagnose: the main thread first stops accepting and finishes what
      // it holds ('quiesce', answered 'quiet'), then the capture streams.
      let pending = null;
      function diagnose(ask) {
        if (busy || pending) return send({ id: ask.id, error: 'a diagnosis is already running' });
        pending = ask;
        parentPort.postMessage({ nodeherd: 'quiesce' });
      }
      parentPort.on('message', (m) => {
        if (!m || m.nodeherd !== 'quiet' || !pending) return;
        const ask = pending;
        pending = null;
        busy = true;
        capture(ask, (err) => {
          busy = false;
          send(err ? { id: ask.id, error: cut(err.message) } : { id: ask.id, end: true });
        });
      });
      function capture(ask, done) {
        const id = ask.id;
        const s = ensure();
        const whole = (text) => {
          for (let i = 0; i < text.length; i += CHUNK) send({ id, chunk: text.slice(i, i + CHUNK) });
          done(null);
        };
        if (ask.what === 'heap-snapshot') {
          const onChunk = (m) => send({ id, chunk: m.params.chunk });
          s.on('HeapProfiler.addHeapSnapshotChunk', onChunk);
          s.post('HeapProfiler.enable', () =>
            s.post('HeapProfiler.takeHeapSnapshot', { reportProgress: false }, (err) => {
              s.off('HeapProfiler.addHeapSnapshotChunk', onChunk);
              s.post('HeapProfiler.disable');
              done(err);
            }));
        } else if (ask.what === 'cpu-profile') {
          s.post('Profiler.enable', () =>
            s.post('Profiler.start', (err) => {
              if (err) return done(err);
              setTimeout(() => s.post('Profiler.stop', (e, r) => {
                s.post('Profiler.disable');
                if (e) return done(e);
                whole(JSON.stringify(r.profile));
              }), Math.max(1, Number(ask.seconds) || 1) * 1000);
            }));
        } else {
          takeStack((err, frames) => (err ? done(err) : whole(JSON.stringify({ frames }))));
        }
      }
      let buf = '';
      sock.on('data', (d) => {
        buf += d;
        if (buf.length > 4096) buf = buf.slice(-4096);
        let nl;
        while ((nl = buf.indexOf('\\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          let ask = null;
          try { ask = JSON.parse(line); } catch (_) {}
          if (!ask || !Number.isInteger(ask.id)) continue;
          if (ask.ask === 'stack') stack(ask.id);
          else if (ask.ask === 'diagnose') diagnose(ask);
        }
      });
    `;
    try {
      const helper = new Worker(source, { eval: true, workerData: { fd }, execArgv: [], stdout: false, stderr: false, name: 'nodeherd-helper' });
      helper.on('error', () => {}); // a broken helper costs the stacks, never the app
      helper.on('message', (m) => {
        if (m && m.nodeherd === 'quiesce') quiesce(() => helper.postMessage({ nodeherd: 'quiet' }));
      });
      helper.unref();
    } catch (_) {
      // could not start a thread: no stacks
    }
  }

  // --- the app's own metrics ------------------------------------------------
  // A scrape of the manager's metrics endpoint asks each worker for the
  // registry of the prom-client the app itself loaded (never one of ours),
  // and merges them with a worker label.
  const appRegistry = () => {
    const key = Object.keys(require.cache).find((k) => /[\\/]prom-client[\\/]index\.js$/.test(k));
    return key && require.cache[key].exports && require.cache[key].exports.register;
  };
  // As a drained worker leaves: its counters as they are then (id 0), so
  // the manager keeps what it counted since its last read; 100 ms at most.
  const lastWords = (then) => {
    const registry = appRegistry();
    if (!channel || !process.connected || !registry || typeof registry.metrics !== 'function') {
      return then();
    }
    let left = false;
    const leave = () => {
      if (!left) {
        left = true;
        then();
      }
    };
    setTimeout(leave, 100);
    Promise.resolve()
      .then(() => registry.metrics())
      .then((text) => {
        try {
          process.send({ nodeherd: 'metrics', id: 0, text: String(text) }, leave);
        } catch (_) {
          leave();
        }
      }, leave);
  };
  if (channel) {
    process.on('internalMessage', (msg) => {
      if (!msg || msg.cmd !== 'NODE_NODEHERD_METRICS') return;
      const registry = appRegistry();
      if (!registry || typeof registry.metrics !== 'function') {
        tell({ nodeherd: 'metrics', id: msg.id, text: null });
        return;
      }
      Promise.resolve()
        .then(() => registry.metrics())
        .then(
          (text) => tell({ nodeherd: 'metrics', id: msg.id, text: String(text) }),
          () => tell({ nodeherd: 'metrics', id: msg.id, text: null }),
        );
    });
  }

  // --- sockets shared through the manager -----------------------------------
  let nextRequest = 1;
  const waiting = new Map();
  const kept = []; // handles received, kept from the garbage collector
  if (channel) {
    process.on('internalMessage', (msg, handle) => {
      if (!msg || msg.cmd !== 'NODE_NODEHERD_BOUND') return;
      const done = waiting.get(msg.id);
      if (!done) return;
      waiting.delete(msg.id);
      if (handle) {
        kept.push(handle);
        done(null, handle);
      } else {
        const e = msg.error || {};
        const err = new Error(e.message || 'listen failed');
        Object.assign(err, { code: e.code, errno: e.errno, syscall: e.syscall || 'listen' });
        if (e.address !== undefined) err.address = e.address;
        if (e.port !== undefined) err.port = e.port;
        done(err);
      }
    });
  }

  // While an answer is due, the channel keeps the process alive: the app's
  // listen() is all it has to do, and an unref'd channel with nothing else
  // pending would let it exit with code 0 before the socket arrives.
  function holdChannel(hold) {
    const ch = process.channel;
    if (!ch) return;
    try {
      if (hold) ch.ref();
      else ch.unref();
    } catch (_) {
      // the channel is closing: parent-death will end us
    }
  }

  // A few requests at a time, the rest in order after them: an app that
  // calls listen() in a loop gets every answer (the manager drops what a
  // channel nobody reads has no room for), and the manager holds nothing
  // for it.
  const MAX_ASKING = 16;
  const queued = [];
  function askManager(request, done) {
    if (waiting.size >= MAX_ASKING) {
      queued.push([request, done]);
      return;
    }
    const id = nextRequest++;
    if (waiting.size === 0) holdChannel(true);
    waiting.set(id, (err, handle) => {
      if (queued.length > 0) askManager(...queued.shift());
      if (waiting.size === 0) holdChannel(false);
      done(err, handle);
    });
    tell(Object.assign({ nodeherd: 'bind', id }, request));
  }

  // A unix path as the kernel would take it from this process (an abstract
  // name, starting with a NUL byte, stays as it is).
  function absolute(p) {
    return p.startsWith('\0') ? p : require('path').resolve(p);
  }

  // listen(port[, host][, backlog][, cb]) | listen(path[, backlog][, cb]) |
  // listen(options[, cb]) | listen(handle[, backlog][, cb])
  function describeListen(args) {
    const first = args[0];
    if (first !== null && typeof first === 'object') {
      if ('fd' in first || '_handle' in first || 'handle' in first) return null;
      if (first.path !== undefined) return { kind: 'unix', path: String(first.path), backlog: first.backlog };
      return { kind: 'tcp', port: Number(first.port) || 0, host: first.host, backlog: first.backlog, ipv6Only: !!first.ipv6Only };
    }
    if (typeof first === 'string' && !/^\d+$/.test(first)) {
      return { kind: 'unix', path: first, backlog: typeof args[1] === 'number' ? args[1] : undefined };
    }
    const port = first === undefined || first === null || typeof first === 'function' ? 0 : Number(first);
    const host = typeof args[1] === 'string' ? args[1] : undefined;
    const backlog = typeof args[1] === 'number' ? args[1] : typeof args[2] === 'number' ? args[2] : undefined;
    return { kind: 'tcp', port, host, backlog };
  }

  const servers = new Set();
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function (...args) {
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    const want = describeListen(args);
    if (want === null) {
      // An app that takes a handed-over socket itself (`listen({fd: 3})`):
      // it is that socket's server all the same (readiness, drain, the
      // connections handed to it).
      const first = args[0];
      const fd = first !== null && typeof first === 'object' && typeof first.fd === 'number' ? first.fd : null;
      const sock = fd === null ? null : sockets.find((s) => s.fd === fd);
      if (sock) {
        sock.claimed = true;
        track(this);
        this.__nodeherd.inherited = true;
        this.__nodeherd.again = { request: { nodeherd: 'again', fd: sock.fd }, tcp: sock.kind === 'tcp', backlog: first.backlog };
        onSocket.set(sock.fd, this);
        this.once('listening', () => tell({ nodeherd: 'listening', fd: sock.fd }));
      }
      return listen.apply(this, args);
    }
    const sock = pick(want.kind, want.port, want.path);
    if (sock) {
      track(this);
      this.__nodeherd.inherited = true;
      this.__nodeherd.again = { request: { nodeherd: 'again', fd: sock.fd }, tcp: sock.kind === 'tcp', backlog: want.backlog };
      onSocket.set(sock.fd, this);
      this.once('listening', () => tell({ nodeherd: 'listening', fd: sock.fd }));
      const opts = { fd: sock.fd };
      if (want.backlog !== undefined) opts.backlog = want.backlog;
      const result = cb ? listen.call(this, opts, cb) : listen.call(this, opts);
      if (isRoundRobin(this) && want.port) answerAsAsked(this, want.port);
      return result;
    }
    if (!channel) return listen.apply(this, args);
    // Shared across the workers: the manager binds it once for all, with
    // this worker's rights. It takes numeric addresses and absolute paths:
    // a host name is looked up here, as Node's own listen() does (its
    // error is the server's), and a relative path is this worker's.
    track(this);
    if (cb) this.once('listening', cb);
    // With no socket handed over, the first port the app listens on is its
    // own: the worker is ready once it answers there.
    if (sockets.length === 0) this.once('listening', () => tell({ nodeherd: 'listening', shared: true }));
    const share = (host) => {
      const request = { kind: want.kind, host: host || null, port: want.port || 0, path: want.path ? absolute(want.path) : null };
      this.__nodeherd.again = { request, tcp: want.kind === 'tcp', backlog: want.backlog };
      askManager(
        request,
        (err, handle) => {
          if (err) {
            this.emit('error', err);
            return;
          }
          if (want.kind === 'tcp') listen.call(this, handle, want.backlog);
          else listen.call(this, { fd: handle.fd, backlog: want.backlog });
        },
      );
    };
    if (want.kind === 'tcp' && want.host && net.isIP(want.host) === 0) {
      require('dns').lookup(want.host, (err, ip) => (err ? this.emit('error', err) : share(ip)));
    } else {
      share(want.host);
    }
    return this;
  };

  // A cluster primary's round-robin server (made by Node's RoundRobinHandle,
  // with its internal assert.fail as connection listener). Its workers check
  // that it is bound to the port they asked for, and take any other port for
  // EADDRINUSE: tell them what they asked.
  function isRoundRobin(server) {
    return (
      server.listeners('connection').some((f) => f.name === 'fail') &&
      String(new Error().stack).includes('RoundRobinHandle')
    );
  }
  function answerAsAsked(server, port) {
    const handle = server._handle;
    if (!handle || typeof handle.getsockname !== 'function') return;
    const getsockname = handle.getsockname;
    handle.getsockname = function (out) {
      const err = getsockname.call(this, out);
      if (out) out.port = port;
      return err;
    };
  }

  // UDP: an explicit bind() maps by the same rule; the implicit bind of a
  // send() or connect() on an unbound socket is the client's own.
  const bind = dgram.Socket.prototype.bind;
  const implicit = Symbol('nodeherd implicit bind');
  for (const method of ['send', 'connect']) {
    const original = dgram.Socket.prototype[method];
    if (typeof original !== 'function') continue;
    dgram.Socket.prototype[method] = function (...args) {
      this[implicit] = true;
      try {
        return original.apply(this, args);
      } finally {
        this[implicit] = false;
      }
    };
  }
  dgram.Socket.prototype.bind = function (...args) {
    const first = args[0];
    if (this[implicit] || (first !== null && typeof first === 'object' && 'fd' in first)) return bind.apply(this, args);
    const port = first !== null && typeof first === 'object' ? first.port : typeof first === 'function' ? 0 : first;
    const sock = pick('udp', Number(port) || 0);
    if (!sock) return bind.apply(this, args);
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    this.once('listening', () => tell({ nodeherd: 'listening', fd: sock.fd }));
    return cb ? bind.call(this, { fd: sock.fd }, cb) : bind.call(this, { fd: sock.fd });
  };

  // An app that runs `cluster` itself: its primary is the worker here. With
  // round-robin scheduling its listen goes through the patched listen above;
  // with SCHED_NONE the handle is made directly, so that is mapped too. It
  // is ready when its first cluster worker listens.
  const cluster = require('cluster');
  if (cluster.isPrimary) {
    const createHandle = net._createServerHandle;
    if (typeof createHandle === 'function') {
      net._createServerHandle = function (address, port, addressType, fd, flags) {
        if (!(typeof fd === 'number' && fd >= 0) && typeof port === 'number' && port >= 0) {
          const sock = pick(port === -1 ? 'unix' : 'tcp', port, typeof address === 'string' && port < 0 ? address : undefined);
          if (sock) return createHandle.call(this, null, -1, -1, sock.fd, flags);
        }
        return createHandle.apply(this, arguments);
      };
    }
    cluster.on('listening', () => tell({ nodeherd: 'listening', via: 'cluster' }));
  }

  // --- even shares of keep-alive connections --------------------------------
  // `open` counts the keep-alive connections of the HTTP servers placed here
  // that are not marked to close; the manager hears it when it changes (at
  // most every 100 ms) and answers with the fair share; the surplus it had
  // then, its next response on a connection says `Connection: close`: the
  // response is whole and the client knows not to reuse the connection, so
  // nothing fails. A connection counts once it is kept alive: from its
  // second request (the first may be its only one: a client that opens a
  // connection per request, with or without `Connection: close`, leaves
  // nothing to even out, and counting it would only make the counts
  // flicker), so without keep-alive every count stays 0 and nothing is sent.
  // On a socket while `open` counts it: not once it is marked to close, nor
  // once it is upgraded (a WebSocket has no response to say close in).
  const counted = Symbol('nodeherd counts this connection');
  const reused = Symbol('a request came on this connection');
  let open = 0;
  // Connections to close at their next response: the surplus the manager's
  // last word found, taken once (never a standing limit: connections in
  // transit would lower every count and make the workers shed on and on).
  let toShed = 0;
  let shareMax = Infinity;
  let reported = -1;
  let reportedAt = 0;
  let reportTimer = null;
  // At once (after this turn of the event loop) when the last report is
  // 100 ms old, else when it will be: at most ten a second.
  function reportSoon() {
    if (!channel || reportTimer) return;
    const wait = Math.max(0, reportedAt + 100 - Date.now());
    reportTimer = setTimeout(() => {
      reportTimer = null;
      if (open === reported) return;
      reported = open;
      reportedAt = Date.now();
      tell({ nodeherd: 'conns', open });
    }, wait);
    reportTimer.unref();
  }
  function uncount(socket) {
    if (!socket || !socket[counted]) return false;
    socket[counted] = false;
    open -= 1;
    reportSoon();
    return true;
  }
  function countKeptAlive(req, res) {
    const socket = req.socket;
    if (!socket || !res || !res.shouldKeepAlive || counted in socket) return;
    if (!socket[reused]) {
      socket[reused] = true;
      return;
    }
    socket[counted] = true;
    open += 1;
    socket.once('close', () => uncount(socket));
    reportSoon();
  }
  function shedIfOver(req, res) {
    countKeptAlive(req, res);
    if (toShed <= 0 || !res || !res.shouldKeepAlive) return;
    if (uncount(req.socket)) {
      toShed -= 1;
      res.shouldKeepAlive = false;
    }
  }
  // --- connections handed over ----------------------------------------------
  // With the steered layout, a connection steered to this worker (below its
  // share of keep-alive connections) reaches a socket only the manager
  // accepts from; the manager hands it over, naming the handed-over socket
  // it is for: the server listening on that one serves it as its own.
  const onSocket = new Map();
  // Connections handed over while draining, and what the drain does once
  // they are gone.
  let lateConnections = 0;
  let lateDone = null;
  if (channel) {
    process.on('internalMessage', (msg, handle) => {
      if (!msg || msg.cmd !== 'NODE_NODEHERD_CONN' || !handle) return;
      const server = onSocket.get(msg.fd);
      if (!server) {
        handle.close();
        return;
      }
      // Node's own accept path (as cluster's round robin hands connections
      // to workers): the server takes it as one it accepted itself.
      if (!stopping && server._handle && typeof server._handle.onconnection === 'function') {
        server._handle.onconnection(0, handle);
        return;
      }
      // Handed over as the worker was told to stop (the manager decided
      // both at once): served all the same, and the drain waits for it.
      const socket = new net.Socket({ handle, readable: true, writable: true });
      lateConnections += 1;
      socket.once('close', () => {
        lateConnections -= 1;
        if (lateDone && lateConnections === 0) lateDone();
      });
      server.emit('connection', socket);
    });
  }

  if (channel) {
    process.on('internalMessage', (msg) => {
      if (!msg || msg.cmd !== 'NODE_NODEHERD_SHARE') return;
      shareMax = typeof msg.max === 'number' && msg.max >= 0 ? msg.max : Infinity;
      toShed = Math.max(0, open - shareMax);
    });
  }

  // --- graceful drain -------------------------------------------------------
  //
  // Draining a server: stop accepting (other workers take the shared queue),
  // let requests in flight finish, answer the next request on each keep-alive
  // connection with `Connection: close`, and close connections that stay idle
  // only after a grace period. Closing an idle keep-alive connection at once
  // races a client that is sending its next request on it, and that request
  // fails; Node's own http `close()` does exactly that since v19. So, for the
  // servers the preload placed, `close()` and `closeIdleConnections()` drain
  // this way, whether the preload calls them or the app's own SIGINT handler
  // does. HTTP/2 sessions get a GOAWAY and their streams finish; upgraded
  // connections (WebSockets) and raw connections are ended cleanly (FIN after
  // what is queued, never a reset) before kill_timeout is up.
  const http = require('http');
  const https = require('https');
  let http2 = null;
  try {
    http2 = require('http2');
  } catch (_) {
    // no http2 in this build
  }
  const grace = Math.max(100, Math.floor(killTimeout * 0.6));
  const lastCall = Math.max(grace + 50, Math.floor(killTimeout * 0.75));
  const netClose = net.Server.prototype.close;

  function track(server) {
    if (server.__nodeherd) return;
    servers.add(server);
    const state = { draining: false, http: false, idleTimer: null, raw: new Set(), upgraded: new Set(), sessions: new Set() };
    server.__nodeherd = state;
    // Per request, one property check: during a drain the response closes its connection.
    server.prependListener('request', onRequest);
    server.prependListener('upgrade', (req, socket) => {
      uncount(socket);
      state.upgraded.add(socket);
      socket.once('close', () => state.upgraded.delete(socket));
    });
    server.prependListener('session', (session) => {
      state.sessions.add(session);
      session.once('close', () => state.sessions.delete(session));
      if (state.draining) goaway(session);
    });
    // Counted where requests arrive (for https, on the TLS socket). The
    // first report (0) goes at once: a worker that gets no connection yet
    // must count in the share as one with none.
    state.http = server instanceof http.Server || server instanceof https.Server;
    if (state.http) reportSoon();
    // A plain net.Server: its connections are the app's protocol, not HTTP.
    if (!(server instanceof http.Server) && !(server instanceof https.Server) && !isHttp2(server)) {
      server.prependListener('connection', (socket) => {
        state.raw.add(socket);
        socket.once('close', () => state.raw.delete(socket));
      });
    }
  }

  function isHttp2(server) {
    return !!server && typeof server.setTimeout === 'function' && server.constructor && /^Http2(Secure)?Server$/.test(server.constructor.name);
  }

  function onRequest(req, res) {
    countResponse(res);
    if (this.__nodeherd.draining && res) res.shouldKeepAlive = false;
    else if (this.__nodeherd.http) shedIfOver(req, res);
  }

  // HTTP/2's graceful shutdown, as proxies do it: a first GOAWAY naming the
  // highest possible stream tells the client to open no new stream here,
  // without refusing one already on its way; a moment later the session
  // closes with a GOAWAY naming the last stream it took, and those finish.
  function goaway(session) {
    if (session.closed || session.destroyed || session.__nodeherdGoaway) return;
    session.__nodeherdGoaway = true;
    try {
      session.goaway(0, 2 ** 31 - 1);
    } catch (_) {
      // already going away
    }
    setTimeout(() => {
      try {
        if (!session.closed && !session.destroyed) session.close();
      } catch (_) {
        // already closing
      }
    }, Math.min(500, grace)).unref();
  }

  function drainServer(server, cb) {
    const state = server.__nodeherd;
    state.draining = true;
    for (const session of state.sessions) goaway(session);
    closeIdleLater(server);
    endLingeringLater(server);
    const result = netClose.call(server, cb);
    // The app closed its last server on a handed-over socket and lives on:
    // with a socket per slot, the manager sends this slot no more connections.
    if (!stopping && !quiet && state.inherited && ![...servers].some((s) => s.__nodeherd.inherited && s.listening)) {
      tell({ nodeherd: 'closed' });
    }
    return result;
  }

  function closeIdleLater(server) {
    const state = server.__nodeherd;
    if (state.idleTimer || typeof server.__nodeherdCloseIdle !== 'function') return;
    state.idleTimer = setTimeout(() => server.__nodeherdCloseIdle(), grace);
    state.idleTimer.unref();
  }

  // Upgraded and raw connections have no request boundary to close them at:
  // they get until shortly before kill_timeout, then a clean end.
  function endLingeringLater(server) {
    const state = server.__nodeherd;
    if (state.lingerTimer) return;
    state.lingerTimer = setTimeout(() => {
      for (const socket of [...state.upgraded, ...state.raw]) {
        socket.end();
        setTimeout(() => socket.destroySoon && socket.destroySoon(), 100).unref();
      }
    }, lastCall - 100);
    state.lingerTimer.unref();
  }

  const protos = [http.Server.prototype, https.Server.prototype];
  for (const proto of protos) {
    const close = proto.close;
    const closeIdle = proto.closeIdleConnections;
    proto.close = function (cb) {
      return this.__nodeherd ? drainServer(this, cb) : close.call(this, cb);
    };
    if (typeof closeIdle === 'function') {
      proto.__nodeherdCloseIdle = closeIdle;
      proto.closeIdleConnections = function () {
        if (!this.__nodeherd) return closeIdle.call(this);
        this.__nodeherd.draining = true;
        closeIdleLater(this);
      };
    }
  }
  // net.Server.close for raw servers and HTTP/2 servers (their close is net's).
  net.Server.prototype.close = function (cb) {
    return this.__nodeherd ? drainServer(this, cb) : netClose.call(this, cb);
  };

  let stopping = false;
  function drain() {
    if (stopping) return;
    stopping = true;
    const done = () => lastWords(() => process.exit(0));
    // Whatever is still open just before kill_timeout is ended cleanly.
    setTimeout(done, lastCall).unref();
    // Servers that listen here; a cluster primary's round-robin servers
    // gave their handle to the cluster and listen no more.
    const listening = [...servers].filter((s) => s.listening);
    // An app that runs cluster itself: its workers stop accepting, finish
    // their connections and leave (cluster.disconnect), then the primary.
    const clustered = cluster.isPrimary && Object.keys(cluster.workers || {}).length > 0;
    let open = listening.length + (clustered ? 1 : 0);
    const finish = () => {
      if (lateConnections === 0) done();
      else lateDone = done;
    };
    const closed = () => {
      open -= 1;
      if (open === 0) finish();
    };
    if (open === 0) return finish();
    if (clustered) cluster.disconnect(closed);
    for (const server of listening) drainServer(server, closed);
  }

  // Out of rotation for a diagnosis: stop accepting and finish what it
  // holds, as a drain does, but live on to be captured.
  let quiet = null; // while out of rotation: the servers it closed, and what keeps it alive
  function quiesce(done) {
    const listening = [...servers].filter((s) => s.listening);
    // With its servers closed, nothing may be left to keep it alive: it
    // waits to be captured, then stopped or resumed.
    quiet = { closed: listening, alive: setInterval(() => {}, 1 << 30) };
    let left = listening.length;
    const finish = () => {
      if (lateConnections === 0) done();
      else lateDone = done;
    };
    if (left === 0) return finish();
    for (const server of listening) drainServer(server, () => --left === 0 && finish());
  }

  // Captured in place (`--then resume`): listen again on the same sockets
  // (closing them closed this process's fd; the manager hands each one
  // back, as it hands a shared one over) and serve as before.
  function resume() {
    if (!quiet || stopping) return;
    const { closed, alive } = quiet;
    quiet = null;
    clearInterval(alive);
    for (const server of closed) {
      const state = server.__nodeherd;
      for (const t of ['idleTimer', 'lingerTimer']) {
        if (state[t]) clearTimeout(state[t]);
        state[t] = null;
      }
      state.draining = false;
      const again = state.again;
      if (!again || server.listening) continue;
      askManager(Object.assign({}, again.request), (err, handle) => {
        if (err) return server.emit('error', err);
        if (again.tcp) listen.call(server, handle, again.backlog);
        else listen.call(server, { fd: handle.fd, backlog: again.backlog });
      });
    }
  }
  if (channel) {
    process.on('internalMessage', (msg) => {
      if (msg && msg.cmd === 'NODE_NODEHERD_RESUME') resume();
    });
  }

  process.on('SIGINT', () => {
    // Another SIGINT listener means the app stops itself its own way.
    if (process.listenerCount('SIGINT') > 1) return;
    drain();
  });
  if (channel) {
    const onMessage = (msg) => {
      if (msg === 'shutdown' && process.listenerCount('message') === 1) drain();
    };
    process.on('message', onMessage);
    // Our listeners must not keep an app alive that would otherwise exit.
    if (process.channel && typeof process.channel.unref === 'function') process.channel.unref();
  }
})();
