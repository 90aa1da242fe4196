// Prints the run's metadata (machine, versions, settings) as JSON; run.sh
// passes what it knows in the environment.
'use strict';
const os = require('os');
const { execFileSync } = require('child_process');

const e = process.env;
const sh = (cmd, ...args) => {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch (_) {
    return null;
  }
};
const status = sh('git', '-C', e.ROOT, 'status', '--porcelain', '--', 'src', 'Cargo.toml', 'Cargo.lock');
process.stdout.write(
  JSON.stringify(
    {
      date: new Date().toISOString(),
      command: e.COMMAND_LINE,
      quick: e.QUICK === '1',
      rounds: Number(e.ROUNDS),
      nice: Number(e.NICE || 0),
      nproc: os.cpus().length,
      cpu: os.cpus()[0].model,
      mem_gib: +(os.totalmem() / 2 ** 30).toFixed(1),
      kernel: os.release(),
      loadavg_start: os.loadavg(),
      node: process.version,
      pm2: e.PM2_VERSION_SEEN,
      oha: sh(e.OHA, '--version'),
      wrk: e.WRK ? (sh('dpkg-query', '-W', '-f', '${Version}', 'wrk') || 'wrk') : null,
      nodeherd: sh(e.NH, '--version'),
      commit: sh('git', '-C', e.ROOT, 'rev-parse', '--short', 'HEAD'),
      dirty: status !== null && status !== '',
      settings: JSON.parse(e.SETTINGS),
    },
    null,
    1,
  ) + '\n',
);
