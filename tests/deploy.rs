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
