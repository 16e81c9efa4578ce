//! Every query of `deploy/grafana-dashboard.json` names a metric that a live
//! proxy's `/metrics` really exports (with the suffix its type gives it).

mod support;

use std::collections::{BTreeSet, HashMap};

use support::*;

/// Metric names in PromQL expressions: identifiers starting with `idemproxy_`.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("idemproxy_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[tokio::test]
async fn dashboard_queries_name_exported_metrics() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    // Some traffic so that labelled series exist.
    c.post_key(&proxy.url("/a"), "dash-1", "x").await;
    c.post_key(&proxy.url("/a"), "dash-1", "x").await;
    c.get(&proxy.url("/plain")).await;
    let metrics = c.get(&proxy.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();

    // Families by type, and the sample names actually present.
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            families.insert(it.next().unwrap().to_owned(), it.next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    let exported = |name: &str| {
        samples.contains(name)
            || families.iter().any(|(family, kind)| match kind.as_str() {
                "counter" => name == format!("{family}_total"),
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{family}{s}")),
                _ => name == family,
            })
    };

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = names_in(expr);
            assert!(
                !names.is_empty(),
                "panel {:?} queries no idemproxy metric: {expr}",
                panel["title"]
            );
            for name in names {
                assert!(
                    exported(&name),
                    "panel {:?} queries {name}, which /metrics does not export",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} metric references checked");
    // The panels the issue asks for are there.
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in ["Replay ratio", "in flight", "p50 / p99", "by outcome", "Store errors"] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel about {want}: {titles:?}"
        );
    }
    assert!(samples.contains("idemproxy_requests_total"));
}
