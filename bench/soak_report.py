#!/usr/bin/env python3
"""The Markdown report of bench/soak.sh: the samples table (at most 40 rows) and a summary.

Reads the samples TSV the script wrote, the statistics of bench/soak_clients.py and wrk's
output; prints Markdown on stdout; writes the samples without their header for gnuplot.
"""

import argparse
import json
import math
import re

NUMERIC = ["elapsed_s", "rss_mib", "cpu_pct", "fds", "conns_open", "refused", "requests",
           "r4xx", "r5xx", "cache_mib", "cache_entries", "idle_held", "slow_open"]


def read_samples(path):
    with open(path) as f:
        lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    header, rows = lines[0], []
    for values in lines[1:]:
        row = dict(zip(header, values))
        for k in NUMERIC:
            row[k] = float(row.get(k) or 0)
        rows.append(row)
    return header, rows


def parse_errors(text):
    out = {}
    if text and text != "-":
        for part in text.split(","):
            kind, _, n = part.partition("=")
            out[kind] = int(float(n))
    return out


def parse_wrk(path):
    try:
        text = open(path).read()
    except OSError:
        return None
    w = {"name": re.sub(r".*wrk-(\w+)\.log$", r"\1", path), "ran": "requests in" in text}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    w["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    w["rate"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    w["socket"] = dict(zip(["connect", "read", "write", "timeout"], map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    w["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Latency\s+([\d.]+\w+)", text)
    w["lat_avg"] = m.group(1) if m else "?"
    m = re.search(r"99%\s+([\d.]+\w+)", text)
    w["lat_p99"] = m.group(1) if m else "?"
    if not w["ran"]:
        w["tail"] = " ".join(text.split())[-200:]
    return w


def slope_per_min(rows, key):
    """Least-squares slope of rows[key] against time, per minute."""
    if len(rows) < 2:
        return 0.0
    xs = [r["elapsed_s"] for r in rows]
    ys = [r[key] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def thin(rows, most=40):
    if len(rows) <= most:
        return rows
    step = math.ceil(len(rows) / (most - 1))
    picked = rows[::step]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", required=True)
    p.add_argument("--clients", required=True)
    p.add_argument("--wrk", nargs="*", default=[])
    p.add_argument("--audit-mib", type=float, default=0)
    p.add_argument("--plot-data")
    p.add_argument("--gateway-died", action="store_true")
    args = p.parse_args()

    header, rows = read_samples(args.samples)
    if args.plot_data:
        with open(args.plot_data, "w") as f:
            for r in rows:
                f.write("\t".join(str(r[k]) for k in header) + "\n")
    if not rows:
        print("**No samples**: the run ended before the first one.")
        return

    # --- the table ------------------------------------------------------------------------
    prev = {"elapsed_s": 0.0, "requests": 0.0}
    for r in rows:
        dt = r["elapsed_s"] - prev["elapsed_s"]
        r["rate"] = (r["requests"] - prev["requests"]) / dt if dt > 0 else 0.0
        prev = r
    shown = thin(rows)
    print(f"## Samples ({len(shown)} of {len(rows)} shown)\n")
    print("| t (s) | RSS MiB | CPU % | fds | conns open | requests | req/s | 4xx | 5xx "
          "| gateway errors | cache MiB | idle held | slow open |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in shown:
        print(f"| {r['elapsed_s']:.0f} | {r['rss_mib']:.1f} | {r['cpu_pct']:.1f} | {r['fds']:.0f} "
              f"| {r['conns_open']:.0f} | {r['requests']:.0f} | {r['rate']:.0f} | {r['r4xx']:.0f} "
              f"| {r['r5xx']:.0f} | {r['errors'].replace(',', ', ')} | {r['cache_mib']:.1f} "
              f"| {r['idle_held']:.0f} | {r['slow_open']:.0f} |")

    # --- the summary ----------------------------------------------------------------------
    first, last = rows[0], rows[-1]
    peak = max(rows, key=lambda r: r["rss_mib"])
    half = [r for r in rows if r["elapsed_s"] >= last["elapsed_s"] / 2]
    duration = last["elapsed_s"]
    cpu = [r["cpu_pct"] for r in rows if r["elapsed_s"] > 0] or [0.0]  # 0 s: before the load
    errors = parse_errors(last["errors"])
    print("\n## Summary\n")
    if args.gateway_died:
        print(f"- **The gateway died** after about {duration:.0f} s (see the script's output).")
    print(f"- **RSS**: {first['rss_mib']:.1f} MiB at {first['elapsed_s']:.0f} s (0: before the load), peak "
          f"{peak['rss_mib']:.1f} MiB at {peak['elapsed_s']:.0f} s, {last['rss_mib']:.1f} MiB at "
          f"the end; trend over the second half {slope_per_min(half, 'rss_mib'):+.2f} MiB/min "
          f"(cache {last['cache_mib']:.1f} MiB in {last['cache_entries']:.0f} entries at the end, "
          f"trend {slope_per_min(half, 'cache_mib'):+.2f} MiB/min).")
    print(f"- **CPU** (gateway, one core = 100 %): mean {sum(cpu) / len(cpu):.1f} %, "
          f"max {max(cpu):.1f} %.")
    print(f"- **File descriptors**: {first['fds']:.0f} at the start, peak "
          f"{max(r['fds'] for r in rows):.0f}, {last['fds']:.0f} at the end. "
          f"**connections_open** (proxy): {min(r['conns_open'] for r in rows):.0f} to "
          f"{max(r['conns_open'] for r in rows):.0f}, {last['conns_open']:.0f} at the end; "
          f"refused {last['refused']:.0f}.")
    print(f"- **Requests** (gateway /metrics): {last['requests']:.0f} in {duration:.0f} s "
          f"({last['requests'] / max(duration, 1):.0f}/s); 4xx {last['r4xx']:.0f}, "
          f"5xx {last['r5xx']:.0f}.")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
    print(f"- **Gateway errors by kind**: {kinds}.")
    for path in args.wrk:
        w = parse_wrk(path)
        if w is None:
            continue
        if not w["ran"]:
            print(f"- **wrk {w['name']}: no result**: {w['tail']}")
            continue
        sock = ", ".join(f"{k} {v}" for k, v in w["socket"].items()) if w["socket"] else "none"
        print(f"- **wrk {w['name']}**: {w['requests']} requests ({w['rate']:.0f}/s), latency mean "
              f"{w['lat_avg']}, p99 {w['lat_p99']}; non-2xx/3xx {w['non2xx']}; socket errors: "
              f"{sock}.")
    try:
        c = json.load(open(args.clients))
    except (OSError, ValueError):
        c = None
    if c:
        counters, series = c["counters"], c["series"]
        held = series.get("idle_held_s")
        held_text = (f", held {held['mean']:.1f} s on average ({held['min']:.1f}–{held['max']:.1f})"
                     if held else "")
        idle_other = {k: v for k, v in counters.items()
                      if k.startswith("idle_")
                      and k not in ("idle_connects", "idle_closed_by_gateway", "idle_status_200")}
        print(f"- **Idle clients**: {counters.get('idle_connects', 0)} connections made, "
              f"{counters.get('idle_closed_by_gateway', 0)} closed by the gateway while idle"
              f"{held_text}; other: {json.dumps(idle_other) if idle_other else 'none'}.")
        wait = series.get("slow_408_after_last_byte_s")
        wait_text = (f", {wait['mean']:.1f} s after the last byte on average "
                     f"({wait['min']:.1f}–{wait['max']:.1f})" if wait else "")
        slow_other = {k: v for k, v in counters.items()
                      if k.startswith("slow_") and k not in ("slow_connects", "slow_status_408")}
        print(f"- **Slow-body clients**: {counters.get('slow_connects', 0)} connections, "
              f"{counters.get('slow_status_408', 0)} answered 408{wait_text}; other: "
              f"{json.dumps(slow_other) if slow_other else 'none'}.")
    print(f"- **Audit file**: {args.audit_mib:.0f} MiB written.")


if __name__ == "__main__":
    main()
