// `npm start` under the manager, as PM2 users write it.
module.exports = {
  apps: [
    {
      name: 'npm-start',
      script: 'npm',
      args: 'start',
      instances: 2,
    },
  ],
};
