-- Paced load for bench/soak.sh: runs another wrk script (SOAK_SCRIPT, e.g. bench/patch.lua or
-- bench/distinct.lua; none: a plain GET of the URL) and waits SOAK_DELAY_MS between a
-- connection's requests, so that the soak holds a moderate rate instead of saturating a core.
local script = os.getenv("SOAK_SCRIPT") or ""
if script ~= "" then dofile(script) end
local pause = tonumber(os.getenv("SOAK_DELAY_MS") or "10")
function delay()
  return pause
end
