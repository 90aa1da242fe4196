-- wrk's summary as one JSON object in the file $WRK_OUT, for bench/run.sh:
-- wrk prints text meant for people, and its Lua `done` hook is the one place
-- that sees the counts and the latency distribution as numbers.
done = function(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open(os.getenv("WRK_OUT"), "w"))
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
  f:close()
end
