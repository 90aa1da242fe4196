'use strict';
// nodeherd's preload, loaded into every Node worker with `node --require`.
//
// It does three things for an unmodified app:
// 1. Makes `server.listen(...)` and `dgram` `socket.bind(...)` serve on the
//    sockets the manager handed over at fd 3.., instead of binding a port
//    that every worker would fight over.
// 2. Tells the manager when the worker listens (its readiness, unless the app
//    uses `wait_ready` and sends 'ready' itself).
// 3. Gives apps that install no SIGINT handler (or no 'shutdown' message
//    handler) a graceful drain on stop: stop accepting, finish requests in
//    flight, close keep-alive connections after their next response, and exit.
//    An app with its own handler keeps its own behaviour.
(() => {
  const net = require('net');
  const dgram = require('dgram');
  const env = process.env;

  // This file must not follow the app into processes it starts itself.
  if (env.NODE_OPTIONS) {
    env.NODE_OPTIONS = env.NODE_OPTIONS.split(/\s+/)
      .filter((w, i, all) => !(w === __filename || (w === '--require' && all[i + 1] === __filename)))
      .join(' ');
  }

  const sockets = (env.NODEHERD_SOCKETS || '')
    .split(',')
    .filter(Boolean)
    .map((desc, i) => {
      const [kind, address, port, name] = desc.split('|');
      return { fd: 3 + i, kind, address, port: port ? Number(port) : null, name };
    });
  const killTimeout = Number(env.NODEHERD_KILL_TIMEOUT_MS) || 1600;
  const tell = (msg) => {
    if (typeof process.send === 'function' && process.connected) {
      try {
        process.send(msg);
      } catch (_) {
        // The manager is gone; parent-death will end us.
      }
    }
  };
  const describe = (s) => `fd ${s.fd} (${s.kind} ${s.address}${s.name ? `, name "${s.name}"` : ''})`;

  // Choose the inherited socket for a listen on `port` (TCP/UDP) or `path` (unix).
  function pick(kind, port, path) {
    const candidates = sockets.filter((s) => s.kind === kind);
    if (candidates.length === 1) return candidates[0];
    if (candidates.length > 1) {
      const byPort = port ? candidates.find((s) => s.port === Number(port)) : undefined;
      if (byPort) return byPort;
      const want = path !== undefined ? String(path) : String(port);
      const byName = candidates.find((s) => s.name === want || s.address === want);
      if (byName) return byName;
    }
    const what = path !== undefined ? `path ${path}` : `port ${port}`;
    const have = sockets.length ? sockets.map(describe).join('; ') : 'none';
    const hint =
      candidates.length > 1
        ? `several ${kind} sockets were inherited and none matches by port or by name (LISTEN_FDNAMES); ` +
          'give each socket FileDescriptorName= equal to the port, or listen on {fd: N}'
        : `no ${kind} socket was inherited; add one with --listen or the .socket unit`;
    const err = new Error(`nodeherd: cannot map listen on ${what} to an inherited socket: ${hint}. Inherited: ${have}`);
    tell({ nodeherd: 'error', message: err.message });
    throw err;
  }

  // listen(port[, host][, backlog][, cb]) | listen(path[, backlog][, cb]) |
  // listen(options[, cb]) | listen(handle[, backlog][, cb])
  function target(args) {
    const first = args[0];
    if (first !== null && typeof first === 'object') {
      if ('fd' in first || '_handle' in first || 'handle' in first) return null;
      if (first.path !== undefined) return pick('unix', undefined, first.path);
      return pick('tcp', first.port || 0);
    }
    if (typeof first === 'string' && !/^\d+$/.test(first)) return pick('unix', undefined, first);
    return pick('tcp', first === undefined || typeof first === 'function' ? 0 : first);
  }

  const servers = new Set();
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function (...args) {
    if (sockets.length === 0) return listen.apply(this, args);
    const sock = target(args);
    if (sock === null) return listen.apply(this, args);
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    track(this);
    this.once('listening', () => tell({ nodeherd: 'listening', fd: sock.fd }));
    return cb ? listen.call(this, { fd: sock.fd }, cb) : listen.call(this, { fd: sock.fd });
  };

  const bind = dgram.Socket.prototype.bind;
  dgram.Socket.prototype.bind = function (...args) {
    if (sockets.length === 0) return bind.apply(this, args);
    const first = args[0];
    if (first !== null && typeof first === 'object' && 'fd' in first) return bind.apply(this, args);
    const port = first !== null && typeof first === 'object' ? first.port : typeof first === 'function' ? 0 : first;
    const sock = pick('udp', port || 0);
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    this.once('listening', () => tell({ nodeherd: 'listening', fd: sock.fd }));
    return cb ? bind.call(this, { fd: sock.fd }, cb) : bind.call(this, { fd: sock.fd });
  };

  // --- graceful drain -------------------------------------------------------
  //
  // Draining a server: stop accepting (other workers take the shared queue),
  // let requests in flight finish, answer the next request on each keep-alive
  // connection with `Connection: close`, and close connections that stay idle
  // only after a grace period. Closing an idle keep-alive connection at once
  // races a client that is sending its next request on it, and that request
  // fails; Node's own http `close()` does exactly that since v19. So, for the
  // servers on inherited sockets, `close()` and `closeIdleConnections()` drain
  // this way, whether the shim calls them or the app's own SIGINT handler does.
  const http = require('http');
  const https = require('https');
  const grace = Math.max(100, Math.floor(killTimeout * 0.6));
  const netClose = net.Server.prototype.close;

  function track(server) {
    servers.add(server);
    server.__nodeherd = { draining: false, idleTimer: null };
    // Per request, one property check: during a drain the response closes its connection.
    server.prependListener('request', onRequest);
  }

  function onRequest(req, res) {
    if (this.__nodeherd.draining) res.shouldKeepAlive = false;
  }

  function drainServer(server, cb) {
    const state = server.__nodeherd;
    state.draining = true;
    closeIdleLater(server);
    return netClose.call(server, cb);
  }

  function closeIdleLater(server) {
    const state = server.__nodeherd;
    if (state.idleTimer || typeof server.__nodeherdCloseIdle !== 'function') return;
    state.idleTimer = setTimeout(() => server.__nodeherdCloseIdle(), grace);
    state.idleTimer.unref();
  }

  for (const proto of [http.Server.prototype, https.Server.prototype]) {
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

  let stopping = false;
  function drain() {
    if (stopping) return;
    stopping = true;
    let open = servers.size;
    const done = () => process.exit(0);
    if (open === 0) return done();
    for (const server of servers) {
      drainServer(server, () => {
        open -= 1;
        if (open === 0) done();
      });
    }
  }

  process.on('SIGINT', () => {
    // Another SIGINT listener means the app stops itself its own way.
    if (process.listenerCount('SIGINT') > 1) return;
    drain();
  });
  if (typeof process.send === 'function') {
    const onMessage = (msg) => {
      if (msg === 'shutdown' && process.listenerCount('message') === 1) drain();
    };
    process.on('message', onMessage);
    // Our listener must not keep an app alive that would otherwise exit.
    if (process.channel && typeof process.channel.unref === 'function') process.channel.unref();
  }
})();
