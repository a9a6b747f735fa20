//! The dashboard and the alerts in deploy/ use only metric names the gateway really exports.

mod support;

use std::collections::BTreeSet;

use http::StatusCode;
use support::*;

/// Every `cloudcasa_gateway_*` name in a text.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cloudcasa_gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
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
        let used = names_in(&text);
        assert!(used.len() >= 5, "{file} uses only {used:?}");
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
