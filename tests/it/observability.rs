//! The alert rules (`deploy/prometheus/alerts.yaml`) and the Grafana dashboard
//! (`deploy/grafana/nats-pg-auth.json`) name only metrics the service exports on /metrics.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{http_get, EnvOptions, TestEnv};

/// Every `nats_pg_auth_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(at) = rest.find("nats_pg_auth_") {
        let start = &rest[at..];
        let end = start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(start.len());
        names.push(start[..end].to_owned());
        rest = &start[end..];
    }
    names
}

/// Series names on /metrics (`name{labels} value` and `name value` lines) and family names
/// from `# TYPE` lines.
fn exported(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            names.extend(t.split_whitespace().next().map(str::to_owned));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every string under `"expr"` or `"query"` keys of the dashboard (panel targets, variables).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let alerts: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yaml")).unwrap(),
    )
    .expect("alerts.yaml is YAML");
    let mut alert_exprs = vec![];
    for group in alerts["groups"].as_sequence().expect("groups") {
        let group_name = group["name"].as_str().expect("group name");
        let rules = group["rules"].as_sequence().expect("rules");
        assert!(!rules.is_empty(), "group {group_name} has rules");
        for rule in rules {
            let name = rule["alert"]
                .as_str()
                .expect("every rule is an alert with a name");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: expr"));
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            alert_exprs.push((name.to_owned(), expr.to_owned()));
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/nats-pg-auth.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for p in panels {
        let title = p["title"].as_str().expect("panel title");
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {title:?} has targets"
        );
    }
    let mut dash_exprs = vec![];
    dashboard_queries(&dashboard, &mut dash_exprs);

    // Deny reasons and the decision summary's quantiles only appear once there were logins.
    let env = TestEnv::start_with(EnvOptions {
        tweak: |args| args.http_listen = "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    env.acme().await;
    env.wait_login(
        "alice",
        "s3cret",
        std::time::Duration::from_secs(10),
        "alice logs in",
    )
    .await;
    assert!(env.connect_user("alice", "wrong").await.is_err());
    let addr = env.http.expect("HTTP endpoints on");
    // acme synced, so this (only) replica leads: the leader gauge says so.
    crate::common::wait_until(
        std::time::Duration::from_secs(10),
        "the leader gauge",
        || async move {
            http_get(addr, "/metrics")
                .await
                .1
                .lines()
                .any(|l| l == "nats_pg_auth_sync_leader 1")
        },
    )
    .await;
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let exported = exported(&body);
    // Every series belongs to a family with a `# TYPE` line (a summary's _sum and _count too).
    let typed: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .collect();
    for name in &exported {
        let family = [name.strip_suffix("_sum"), name.strip_suffix("_count")]
            .into_iter()
            .flatten()
            .find(|base| typed.contains(base))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no # TYPE line:\n{body}");
    }
    assert!(exported.contains("nats_pg_auth_decision_seconds"), "{body}");

    let mut used = BTreeSet::new();
    for (what, exprs) in [
        ("alerts.yaml", alert_exprs),
        (
            "nats-pg-auth.json",
            dash_exprs.into_iter().map(|e| (String::new(), e)).collect(),
        ),
    ] {
        for (rule, expr) in exprs {
            let names = metric_names(&expr);
            if what == "alerts.yaml" {
                assert!(
                    !names.is_empty(),
                    "{what} {rule}: no nats_pg_auth metric in {expr}"
                );
            }
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{what} {rule}: {name} is not exported; /metrics has {exported:?}"
                );
                used.insert(name);
            }
        }
    }
    // docs/operations.md lists every exported family in its table (issue 18 item 7: it said
    // the outbox and the leadership were not exported while /metrics had them).
    let operations = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    for family in &typed {
        assert!(
            operations.contains(&format!("`{family}")),
            "docs/operations.md does not list {family}, which /metrics exports"
        );
    }
    assert!(
        !operations.contains("Not exported"),
        "docs/operations.md still says some metrics are not exported"
    );
    // The gauges the runbooks rely on are alerted on.
    for name in [
        "nats_pg_auth_cache_listener_up",
        "nats_pg_auth_db_outage",
        "nats_pg_auth_copy_stale_seconds",
        "nats_pg_auth_logins_denied_total",
        "nats_pg_auth_sync_failures_total",
    ] {
        assert!(used.contains(name), "{name} is used");
    }
}

/// An operator at 3 a.m. looks a deny reason up: every reason the service counts is in the
/// troubleshooting table and in the README's list. (`callout::tests::all_lists_every_reason`
/// keeps `DenyReason::ALL` in step with the enum.)
#[test]
fn every_deny_reason_is_documented() {
    use nats_pg_auth::callout::DenyReason;
    let troubleshooting = include_str!("../../docs/troubleshooting.md");
    let readme = include_str!("../../README.md");
    let names: std::collections::BTreeSet<_> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DenyReason::ALL.len(), "distinct names");
    for name in names {
        let cell = format!("| `{name}` |");
        assert!(
            troubleshooting.contains(&cell),
            "docs/troubleshooting.md lacks a row for {name}"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not list {name}"
        );
    }
}
