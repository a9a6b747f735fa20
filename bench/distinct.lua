-- Distinct items, /api/v1/items/1 .. /api/v1/items/N, then around again: fills a cache.
local n = tonumber(os.getenv("BENCH_ENTRIES") or "100000")
local i = 0
request = function()
  i = i % n + 1
  return wrk.format("GET", "/api/v1/items/" .. i)
end
