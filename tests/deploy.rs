//! The dashboard and the alerts in deploy/ use only metric names the gateway really exports.

mod support;

use std::collections::BTreeSet;

use http::StatusCode;
use support::*;

/// Every `cloudcasa_gateway_*` or `process_*` name anywhere in a text (descriptions and legends
/// included), whether or not it is in a query.
fn prefixed_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["cloudcasa_gateway_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let starts_a_word = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if starts_a_word {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// Words of PromQL that look like metric names but are not: aggregations (`sum by (le) (…)`
/// puts a keyword, not a parenthesis, after `sum`), binary and set operators, modifiers.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// The metric names a PromQL expression selects: every identifier outside strings, label
/// matchers (`{…}`), ranges (`[…]`) and label lists (`by (…)`, `on (…)`, …) that is neither a
/// function call nor a PromQL word. A name used bare (`process_max_fds`) counts as much as one
/// with matchers.
fn promql_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut previous_word = String::new();
    let skip_to = |from: usize, close: char| {
        chars[from..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |p| from + p + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '(' if matches!(
                previous_word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) =>
            {
                previous_word.clear();
                i = skip_to(i + 1, ')');
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number (1000, 0.99, 1e3): its letters are no name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i]))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let called = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'(');
                let keyword = PROMQL_WORDS.contains(&word.to_ascii_lowercase().as_str());
                if !called && !keyword {
                    names.insert(word.clone());
                }
                previous_word = word;
            }
            c => {
                if !c.is_whitespace() {
                    previous_word.clear();
                }
                i += 1;
            }
        }
    }
    names
}

/// The PromQL expressions of a dashboard (every `"expr"` string of its JSON) or a rules file
/// (every `expr:` value of its YAML, on one line or as a `|` block).
fn expressions_in(file: &str, text: &str) -> Vec<String> {
    if file.ends_with(".json") {
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match v.as_str() {
                            Some(expr) if k == "expr" => out.push(expr.to_string()),
                            _ => walk(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&serde_json::from_str(text).unwrap(), &mut out);
        return out;
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line
            .trim_start()
            .trim_start_matches("- ")
            .strip_prefix("expr:")
        else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with('|') && !value.starts_with('>') {
            out.push(value.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[n + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .copied()
            .collect();
        out.push(block.join("\n"));
    }
    out
}

/// Every metric name a dashboard or rules file uses: in its queries, and prefixed names
/// anywhere else in it.
fn names_in(file: &str, text: &str) -> BTreeSet<String> {
    let mut names = prefixed_names_in(text);
    for expr in expressions_in(file, text) {
        names.extend(promql_names(&expr));
    }
    names
}

#[test]
fn promql_names_finds_every_metric_and_nothing_else() {
    let expr = "histogram_quantile(0.99, sum by (le, method) (rate(a_bucket{x=~\"b|c\"}[5m]))) \
                / (process_open_fds{namespace=~\"$namespace\"} / process_max_fds) \
                and on (namespace, instance) build_info > 1e3 or vector(1) unless max(up offset 5m)";
    let names: Vec<String> = promql_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "a_bucket",
            "build_info",
            "process_max_fds",
            "process_open_fds",
            "up"
        ]
    );
    let rules = "  - alert: A\n    expr: |\n      sum(x_total)\n        / y\n    for: 5m\n  - expr: z == 0\n";
    let names: Vec<String> = names_in("r.yaml", rules).into_iter().collect();
    assert_eq!(names, ["x_total", "y", "z"]);
}

#[tokio::test]
async fn dashboard_and_alerts_use_exported_metric_names() {
    let (mock, _secret, gw) = setup(
        "[server]\nmax_body_size = \"1KiB\"\n\
         [[policy]]\nclients = [\"local\"]\npaths = [\"/api/v1/**\"]\ncredential = \"default\"\n",
    )
    .await;
    let (id, _) = item(&mock, "ops");
    // Traffic that touches every family: a miss, a revalidation, a 413, a 403, a 502.
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    post_oversized(&gw).await.envelope_message(413);
    get(&gw.url("/version"), &[]).await.envelope_message(403);
    mock.state.set_fault(Fault::Reset, Some(1));
    get(&gw.url("/api/v1/clusters"), &[])
        .await
        .envelope_message(502);
    gw.wait_audit(5).await;

    let exposition = get(&gw.admin_url("/metrics"), &[]).await.text();
    // Names with at least one sample (not merely described).
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();

    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/grafana/cloudcasa-gateway.json",
        "deploy/prometheus/alerts.yaml",
        "deploy/kubernetes/components/prometheus/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used = names_in(file, &text);
        assert!(used.len() >= 5, "{file} uses only {used:?}");
        // The process metrics the resource alerts and panels need are among them (a guard on
        // the name extraction itself, which once saw only cloudcasa_gateway_*).
        assert!(used.contains("process_open_fds"), "{file}: {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses names /metrics does not export: {missing:?}\nexported: {exported:#?}"
        );
    }
}

/// The `cache` label values a selector `cache=~"a|b"` in `expr` matches, in order of appearance.
fn cache_selectors(expr: &str) -> Vec<Vec<String>> {
    expr.match_indices("cache=~\"")
        .map(|(at, m)| {
            let rest = &expr[at + m.len()..];
            rest[..rest.find('"').unwrap()]
                .split('|')
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The sum of `cloudcasa_gateway_requests_total` over series whose `cache` is in `values`.
fn requests_with_cache(exposition: &str, values: &[String]) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with("cloudcasa_gateway_requests_total{"))
        .filter(|l| values.iter().any(|v| l.contains(&format!("cache=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 16: the shipped cache alert, evaluated on the metrics of a healthy default deployment
/// (`fresh_for = 0s`, so every repeated read is a revalidation), stays far from its threshold.
/// Counters start at zero in the run, so the ratio of their values is the ratio of their rates.
/// The alert's hits-only expression of before read 0 on the same traffic, and fired.
#[tokio::test]
async fn the_cache_alert_stays_quiet_in_a_healthy_default_deployment() {
    let (mock, _secret, gw) = setup("").await;
    let paths: Vec<String> = (0..5)
        .map(|i| format!("/api/v1/usergroups/{}", item(&mock, &format!("g{i}")).0))
        .collect();
    for _ in 0..10 {
        for path in &paths {
            assert_eq!(get(&gw.url(path), &[]).await.status, StatusCode::OK);
        }
    }
    let exposition = get(&gw.admin_url("/metrics"), &[]).await.text();

    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/kubernetes/components/prometheus/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let start = text
            .find("alert: CloudCasaGatewayCacheHitRatioCollapsed")
            .unwrap();
        let block = &text[start..];
        let block = &block[..block.find("- alert:").unwrap_or(block.len())];
        let selectors = cache_selectors(block);
        assert_eq!(selectors.len(), 2, "{file}: {block}");
        let served = requests_with_cache(&exposition, &selectors[0]);
        let reads = requests_with_cache(&exposition, &selectors[1]);
        assert_eq!(reads, 50.0, "{file}: {exposition}");
        let ratio = served / reads;
        assert!(ratio >= 0.9, "{file}: ratio {ratio} ({served}/{reads})");
        assert!(
            block.contains(") < 0.1"),
            "{file}: threshold changed: {block}"
        );
    }
    let value = |name: &str| {
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap()
    };
    let hits = value("cloudcasa_gateway_cache_hits_total");
    let old_ratio = hits
        / (hits
            + value("cloudcasa_gateway_cache_misses_total")
            + value("cloudcasa_gateway_cache_revalidations_total"));
    assert!(old_ratio < 0.1, "the old expression read {old_ratio}");
}
