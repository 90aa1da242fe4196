// One host of the fleet: the same file on every host. The balancer polls
// /health on port 9210 (and HAProxy's agent-check on 9211); a stop (a
// reboot, `systemctl stop`, a package
// removal) says "take me out" first and serves 2 s more, so the balancer
// has noticed (inter 250ms, fall 2) before any worker stops.
module.exports = {
  apps: [
    {
      name: 'web',
      script: './app.js',
      instances: 2,
      listen: '0.0.0.0:8080',
      health: '0.0.0.0:9210',
      health_agent: '0.0.0.0:9211',
      drain_before_stop: '2s',
    },
  ],
};
