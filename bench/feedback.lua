-- wrk script: POST a new ranking per request. Each (comparison, user) pair is unique, so every request is a
-- new event (no duplicates), spread over the comparisons the benchmark seeded.
local counter = 0
local comparisons = tonumber(os.getenv("BENCH_COMPARISONS") or "1000")
local prefix = os.getenv("BENCH_PREFIX") or "bench"
local run = os.getenv("BENCH_RUN") or "0"  -- users differ from run to run, so every request stays a new ranking
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  counter = counter + 1
  local body = string.format(
    '{"comparison_id": "%s-%d", "ranking": [[%d], [%d, %d], [%d]], "user": "u%s-%d"}',
    prefix, counter % comparisons, counter % 4, (counter + 1) % 4, (counter + 2) % 4, (counter + 3) % 4, run, counter
  )
  return wrk.format(nil, "/v1/feedback", nil, body)
end
