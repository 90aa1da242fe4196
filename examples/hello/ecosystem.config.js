// A PM2 ecosystem file; nodeherd reads it as is:
//   nodeherd run examples/hello/ecosystem.config.js --listen 127.0.0.1:8000
module.exports = {
  apps: [
    {
      name: 'hello',
      script: './app.js',
      instances: 'max',
      exec_mode: 'cluster',
      env: { NODE_ENV: 'production' },
      kill_timeout: 1600,
      listen_timeout: 3000,
    },
  ],
};
