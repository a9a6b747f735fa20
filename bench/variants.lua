-- Query variants of one path: /api/v1/fresh?page=FIRST .. ?page=FIRST+COUNT-1, then around
-- again (VARIANT_FIRST, VARIANT_COUNT; defaults 1 and 20000). With FIRST past what is stored,
-- every request is a miss that stores one more variant.
local first = tonumber(os.getenv("VARIANT_FIRST") or "1")
local count = tonumber(os.getenv("VARIANT_COUNT") or "20000")
local i = 0
request = function()
  local page = first + (i % count)
  i = i + 1
  return wrk.format("GET", "/api/v1/fresh?page=" .. page)
end
