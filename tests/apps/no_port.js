// A worker with no port at all (a queue consumer): it only ticks.
setInterval(() => {}, 1000);
