#!/usr/bin/env python3
"""Turns bench/run.sh's raw wrk outputs into the results table.

Reads RESULTS_DIR/*.wrk (named SCENARIO.SERVER.ROUND.wrk) and RESULTS_DIR/*.txt facts; writes
Markdown to stdout.
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
SCENARIOS = {
    "a": "fresh hit, 1 KiB item",
    "b": "fresh hit, 100 KiB collection",
    "c": "hit revalidated upstream (304)",
    "d": "uncached GET pass-through",
    "e": "PATCH with If-Match pass-through",
    "f": "fresh hit, 1 KiB, 256 connections",
    "g": "fresh hit, 1 KiB: audit to a file on vs off",
    "h": "fresh hit, 1 KiB: audit file vs nginx's JSON access log",
    "i": "PATCH pass-through: audit file vs nginx's JSON access log",
}
# scenario -> (minimum gateway/nginx req/s, minimum gateway/ceiling req/s)
TARGETS = {"a": (1.2, 0.85), "b": (1.2, 0.85), "f": (1.2, 0.85), "c": (1.0, None),
           "d": (1.0, None), "e": (1.0, None)}


def parse(path):
    text = path.read_text()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", text, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: (.*)", text)

    def ms(v):
        m = re.match(r"([\d.]+)(\w+)", v)
        return float(m.group(1)) * UNITS[m.group(2)]

    if not rps or "50" not in lat or "99" not in lat:
        return None
    return {"rps": float(rps.group(1)), "p50": ms(lat["50"]), "p99": ms(lat["99"]),
            "bad": int(errors.group(1)) if errors else 0, "socket": sockets.group(1) if sockets else ""}


def main():
    d = Path(sys.argv[1])
    runs = defaultdict(list)
    files = [(f, *f.stem.split(".")) for f in d.glob("*.wrk")]
    # By scenario, server and round number (as a number: round 10 after round 9).
    for f, scenario, server, _round in sorted(files, key=lambda x: (x[1], x[2], int(x[3]))):
        r = parse(f)
        if r is None:
            print(f"warning: could not parse {f.name}", file=sys.stderr)
            continue
        runs[(scenario, server)].append(r)

    def mean(scenario, server, key):
        rs = runs.get((scenario, server))
        return sum(r[key] for r in rs) / len(rs) if rs else None

    def per_round(scenario, a, b):
        """Round k of `a` against round k of `b` (measured one after the other): the spread a
        single mean hides on a shared machine."""
        pairs = [x["rps"] / y["rps"] for x, y in zip(runs.get((scenario, a), []), runs.get((scenario, b), []))]
        if len(pairs) < 2:
            return None
        ordered = sorted(pairs)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        return f"({s}) {a}/{b} by round: " + ", ".join(f"{p:.2f}" for p in pairs) + f" (median {median:.2f})"

    out = []
    if len(sys.argv) > 2 and sys.argv[2] == "--smoke":
        out.append("*Smoke run: debug build, about a second per scenario. It shows the script works; "
                   "its figures and verdicts measure nothing.*")
        out.append("")
    out.append("| scenario | server | req/s | p50 ms | p99 ms | gateway/nginx req/s | gateway p99 ≤ nginx | gateway/ceiling req/s (d, e: gateway/bare-proxy) | target |")
    out.append("|---|---|---:|---:|---:|---:|---|---:|---|")
    problems = []
    spreads = []
    for s, title in SCENARIOS.items():
        order = ["gateway", "gateway-audit", "nginx", "nginx-log", "ceiling", "bare-proxy"]
        servers = sorted({srv for (sc, srv) in runs if sc == s}, key=order.index)
        for srv in servers:
            rps, p50, p99 = (mean(s, srv, k) for k in ("rps", "p50", "p99"))
            bad = sum(r["bad"] for r in runs[(s, srv)])
            if bad:
                problems.append(f"{s}/{srv}: {bad} non-2xx/3xx responses")
            ratio_n = ratio_c = le = verdict = ""
            if s == "g" and srv == "gateway-audit":
                base = mean(s, "gateway", "rps")
                r = rps / base
                spreads.append(per_round(s, "gateway-audit", "gateway"))
                ratio_n = f"{r:.2f}× audit off"
                verdict = "met (≥ 0.90)" if r >= 0.9 else "missed (< 0.90)"
            elif srv == "gateway-audit" and s in ("h", "i"):
                # Like for like: a JSON line per request on both sides.
                n_rps, n_p99 = mean(s, "nginx-log", "rps"), mean(s, "nginx-log", "p99")
                r_n = rps / n_rps
                ratio_n = f"{r_n:.2f}× nginx-log" + (
                    f", {rps / mean(s, 'nginx', 'rps'):.2f}× nginx" if mean(s, "nginx", "rps") else "")
                le = "yes" if p99 <= n_p99 else f"no ({p99:.2f} > {n_p99:.2f})"
                spreads.append(per_round(s, "gateway-audit", "nginx-log"))
                if s == "h":
                    ok = r_n >= 1.2 and p99 <= n_p99
                    verdict = ("met" if ok else "missed") + " (≥ 1.2× nginx-log, p99 ≤ nginx-log)"
                else:
                    r_c = rps / mean(s, "bare-proxy", "rps")
                    spreads.append(per_round(s, "gateway-audit", "bare-proxy"))
                    ratio_c = f"{r_c:.2f}"
                    verdict = ("met" if r_c >= 0.9 else "missed") + " (≥ 0.9× bare-proxy)"
            elif srv == "gateway" and s in TARGETS:
                n_rps, n_p99 = mean(s, "nginx", "rps"), mean(s, "nginx", "p99")
                # The ceiling for hits; for pass-through, the bare hyper proxy (no target).
                c_rps = mean(s, "ceiling", "rps") or mean(s, "bare-proxy", "rps")
                want_n, want_c = TARGETS[s]
                r_n = rps / n_rps
                ratio_n = f"{r_n:.2f}"
                le = "yes" if p99 <= n_p99 else f"no ({p99:.2f} > {n_p99:.2f})"
                ok = r_n >= want_n and p99 <= n_p99
                if c_rps:
                    r_c = rps / c_rps
                    ratio_c = f"{r_c:.2f}"
                    ok = ok and (want_c is None or r_c >= want_c)
                want = f"≥ {want_n}× nginx, p99 ≤ nginx" + (f", ≥ {want_c}× ceiling" if want_c else "")
                verdict = ("met" if ok else "missed") + f" ({want})"
            label = f"({s}) {title}" if srv == servers[0] else ""
            out.append(f"| {label} | {srv} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {ratio_n} | {le} | {ratio_c} | {verdict} |")
    spreads = [x for x in spreads if x]
    if spreads:
        out.append("")
        out.append("Ratios by round (the verdicts use the means above): " + "; ".join(spreads) + ".")
    for f in sorted(d.glob("*.txt")):
        out.append("")
        out.append(f.read_text().rstrip())
    if problems:
        out.append("")
        out.append("**Errors during the runs:** " + "; ".join(problems))
    print("\n".join(out))


if __name__ == "__main__":
    main()
