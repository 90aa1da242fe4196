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
  let draining = false;

  function track(server) {
    servers.add(server);
    const conns = new Set();
    server.__nodeherdConns = conns;
    server.on('connection', (c) => {
      conns.add(c);
      c.__nodeherdBusy = 0;
      c.on('close', () => conns.delete(c));
    });
    // Only HTTP servers emit 'request'; for them keep-alive ends cleanly.
    server.prependListener('request', (req, res) => {
      const c = req.socket;
      c.__nodeherdBusy = (c.__nodeherdBusy || 0) + 1;
      if (draining) res.shouldKeepAlive = false;
      res.once('close', () => {
        c.__nodeherdBusy -= 1;
        if (draining && c.__nodeherdBusy === 0) setImmediate(() => c.destroySoon ? c.destroySoon() : c.end());
      });
      res.__nodeherdPending = true;
      res.once('finish', () => (res.__nodeherdPending = false));
      (server.__nodeherdResponses ||= new Set()).add(res);
      res.once('close', () => server.__nodeherdResponses.delete(res));
    });
  }

  function drain() {
    if (draining) return;
    draining = true;
    // Keep-alive connections that stay idle are closed after a grace period,
    // not at once: a client may be sending its next request on one right now,
    // and that request will be answered with `Connection: close` instead.
    const grace = Math.max(100, Math.floor(killTimeout * 0.6));
    let open = servers.size;
    const done = () => process.exit(0);
    if (open === 0) return done();
    for (const server of servers) {
      for (const res of server.__nodeherdResponses || []) {
        if (!res.headersSent) res.shouldKeepAlive = false;
      }
      // net.Server's close, not http.Server's: since Node 19 the latter also
      // closes idle keep-alive connections at once, racing clients that are
      // sending their next request on them (they would see a reset).
      net.Server.prototype.close.call(server, () => {
        open -= 1;
        if (open === 0) done();
      });
    }
    setTimeout(() => {
      for (const server of servers) {
        for (const c of server.__nodeherdConns || []) {
          if (!c.__nodeherdBusy) c.destroy();
        }
      }
    }, grace).unref();
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
