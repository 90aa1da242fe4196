// The example app, installed as /etc/nodeherd/hello.config.js.
//
// Start it:    systemctl enable --now nodeherd@hello.socket
// Try it:      curl http://127.0.0.1:8000/
// Look at it:  nodeherd status hello
//
// nodeherd@hello.service runs `nodeherd run /etc/nodeherd/hello`, which finds
// this file. The listening socket belongs to nodeherd@hello.socket, not to
// this file: the packages add a drop-in to it,
// /usr/lib/systemd/system/nodeherd@hello.socket.d/listen-8000.conf, that
// listens on 127.0.0.1:8000 instead of the template's Unix socket. The app
// calls listen(8000) and nodeherd hands it that socket.
//
// A new app: copy this file to /etc/nodeherd/NAME.config.js, point script at
// your code, and `systemctl enable --now nodeherd@NAME.socket`.
module.exports = {
  apps: [
    {
      name: 'hello',
      script: '/usr/share/nodeherd/examples/hello/app.js',
      // One worker per CPU would be 'max'; two show the round-robin.
      instances: 2,
      env: {
        NODE_ENV: 'production',
      },
    },
  ],
};
