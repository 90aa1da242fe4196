// Dies at once, every time.
console.error('crashing on purpose');
process.exit(7);
