//! Merging a role and a user into the permissions and limits of one user JWT (design §4).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::db::logins::LoginRow;

/// Publish and subscribe allowed when a user and its role grant nothing at all (pb-nats: `>`).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            publish: vec![">".into()],
            subscribe: vec![">".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Lists {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Response {
    pub max: i64,
    pub ttl: Duration,
}

/// The outcome of a merge; what the minted JWT carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Merged {
    pub publish: Lists,
    pub subscribe: Lists,
    pub response: Option<Response>,
    pub max_subscriptions: i64,
    pub max_data: i64,
    pub max_payload: i64,
}

/// Seconds as Postgres sends them (`EXTRACT(EPOCH FROM interval)::float8`) as a Duration:
/// None for nothing, zero, negative or NaN; saturating for huge values and `'infinity'`
/// (Postgres 17), where `Duration::from_secs_f64` would panic. The schema bounds these
/// columns; rows older than the bounds must still not take the login task down.
pub fn secs(s: Option<f64>) -> Option<Duration> {
    let s = s.filter(|s| *s > 0.0)?; // NaN compares false
    Some(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// Sorted, de-duplicated union. Sorting makes the JWT deterministic for equal inputs.
fn union(a: Option<&[String]>, b: &[String]) -> Vec<String> {
    a.unwrap_or_default()
        .iter()
        .chain(b)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Allow = role ∪ user, deny = role ∪ user; deny wins because NATS applies deny after allow.
/// When all four lists are empty the configured defaults apply.
pub fn merge(login: &LoginRow, defaults: &Defaults) -> Merged {
    let mut publish = Lists {
        allow: union(login.role_pub_allow.as_deref(), &login.user_pub_allow),
        deny: union(login.role_pub_deny.as_deref(), &login.user_pub_deny),
    };
    let mut subscribe = Lists {
        allow: union(login.role_sub_allow.as_deref(), &login.user_sub_allow),
        deny: union(login.role_sub_deny.as_deref(), &login.user_sub_deny),
    };
    if publish.allow.is_empty()
        && publish.deny.is_empty()
        && subscribe.allow.is_empty()
        && subscribe.deny.is_empty()
    {
        publish.allow = defaults.publish.clone();
        subscribe.allow = defaults.subscribe.clone();
    }
    let response = (login.role_allow_response == Some(true)).then(|| Response {
        // NATS: -1 unlimited; 0 would mean "server default", which is 1. Say 1 explicitly.
        max: match login.role_allow_response_max.unwrap_or(1) {
            0 => 1,
            n => i64::from(n),
        },
        ttl: secs(login.role_allow_response_ttl_secs).unwrap_or_default(),
    });
    let limit = |user: Option<i64>, role: Option<i64>| user.or(role).unwrap_or(-1);
    Merged {
        publish,
        subscribe,
        response,
        max_subscriptions: limit(login.user_max_subscriptions, login.role_max_subscriptions),
        max_data: limit(login.user_max_data, login.role_max_data),
        max_payload: limit(login.user_max_payload, login.role_max_payload),
    }
}

/// The rights of an MQTT connection: `merged` plus, for each subscribe allow `X.>`, the parent
/// `X` (`None` when nothing is added). MQTT's `X/#` also matches `X` itself, so nats-server
/// subscribes both `X` and `X.>` for it and refuses the whole SUBACK unless both are allowed: a
/// role granting `sensors.>` would otherwise never let a device subscribe `sensors/#`. A parent
/// that a subscribe deny covers is left out (deny wins, as everywhere else). Only MQTT logins get
/// it: a NATS client granted `sensors.>` keeps not receiving `sensors`.
pub fn for_mqtt(merged: &Merged) -> Option<Merged> {
    let sub = &merged.subscribe;
    let parents: Vec<String> = sub
        .allow
        .iter()
        // An allow a deny covers whole grants nothing, so it brings no parent either.
        .filter(|allow| !sub.deny.iter().any(|deny| covers(deny, allow)))
        .filter_map(|allow| allow.strip_suffix(".>"))
        .filter(|parent| !parent.is_empty() && !parent.contains(' '))
        .filter(|parent| !sub.deny.iter().any(|deny| covers(deny, parent)))
        .filter(|parent| !sub.allow.iter().any(|a| a == parent))
        .map(str::to_owned)
        .collect();
    if parents.is_empty() {
        return None;
    }
    let mut out = merged.clone();
    out.subscribe.allow = union(Some(&sub.allow), &parents);
    Some(out)
}

/// Whether the NATS pattern `pattern` matches every subject `subject` does (`subject` may hold
/// wildcards): `*` matches any one token but `>`, a final `>` one or more, anything else only
/// itself.
/// A deny with a queue group (`subject queue`) only denies that group, so it covers nothing here.
fn covers(pattern: &str, subject: &str) -> bool {
    if pattern.contains(' ') {
        return false;
    }
    let mut want = subject.split('.');
    for token in pattern.split('.') {
        match (token, want.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(s)) if s != ">" => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    want.next().is_none()
}

/// TTL: user → role → account → service default, capped by the configured maximum, never
/// below one second (the server's expiry timer has one-second resolution).
pub fn ttl(login: &LoginRow, default: Duration, max: Duration) -> Duration {
    let chosen = [
        login.user_ttl_secs,
        login.role_ttl_secs,
        login.account_ttl_secs,
    ]
    .into_iter()
    .find_map(secs)
    .unwrap_or(default);
    chosen.min(max).max(Duration::from_secs(1))
}

/// Why a connection is refused by the role's source/connection-type rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRule {
    SourceNotAllowed,
    ConnectionTypeNotAllowed,
}

/// nats-server ignores `src` and `allowed_connection_types` for callout users (protocol doc
/// §3.7), so the service enforces them at login.
pub fn check_connection(
    allowed_sources: Option<&[IpNetwork]>,
    allowed_connection_types: Option<&[String]>,
    host: Option<&str>,
    kind: Option<&str>,
    client_type: Option<&str>,
) -> Result<(), ConnectionRule> {
    if let Some(sources) = allowed_sources.filter(|s| !s.is_empty()) {
        let ip: Option<IpAddr> =
            host.and_then(|h| h.trim_matches(|c| c == '[' || c == ']').parse().ok());
        match ip {
            Some(ip) if sources.iter().any(|net| net.contains(ip)) => {}
            _ => return Err(ConnectionRule::SourceNotAllowed),
        }
    }
    if let Some(types) = allowed_connection_types.filter(|t| !t.is_empty()) {
        let ours = connection_type(kind, client_type);
        if !types.iter().any(|t| t.eq_ignore_ascii_case(ours)) {
            return Err(ConnectionRule::ConnectionTypeNotAllowed);
        }
    }
    Ok(())
}

/// Maps the request's `client_info.kind`/`type` to the JWT connection-type names.
pub fn connection_type(kind: Option<&str>, client_type: Option<&str>) -> &'static str {
    let kind = kind.unwrap_or("Client").to_ascii_lowercase();
    let ty = client_type.unwrap_or("nats").to_ascii_lowercase();
    match (kind.as_str(), ty.as_str()) {
        ("leafnode", "websocket") => "LEAFNODE_WS",
        ("leafnode", _) => "LEAFNODE",
        (_, "websocket") => "WEBSOCKET",
        (_, "mqtt") => "MQTT",
        (_, "mqtt_ws") | (_, "mqtt-ws") => "MQTT_WS",
        (_, "in_process") | (_, "in-process") => "IN_PROCESS",
        _ => "STANDARD",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn connection_types_as_the_real_server_sends_them() {
        // Seen on nats-server 2.15.1 (tests/it/doors.rs): kind/type per door. A leaf node has
        // no type; MQTT over WebSocket says "mqtt" (so MQTT_WS and LEAFNODE_WS never match).
        assert_eq!(connection_type(Some("Client"), Some("nats")), "STANDARD");
        assert_eq!(
            connection_type(Some("Client"), Some("websocket")),
            "WEBSOCKET"
        );
        assert_eq!(connection_type(Some("Client"), Some("mqtt")), "MQTT");
        assert_eq!(connection_type(Some("Leafnode"), None), "LEAFNODE");
        assert_eq!(connection_type(Some("Leafnode"), Some("")), "LEAFNODE");
    }

    pub fn login() -> LoginRow {
        LoginRow {
            user_id: 1,
            username: "alice".into(),
            password_hash: None,
            nkey: None,
            user_active: true,
            user_pub_allow: vec![],
            user_pub_deny: vec![],
            user_sub_allow: vec![],
            user_sub_deny: vec![],
            user_max_subscriptions: None,
            user_max_data: None,
            user_max_payload: None,
            user_ttl_secs: None,
            user_mqtt_client_ids: vec![],
            role_id: None,
            role_account_id: None,
            role_pub_allow: None,
            role_pub_deny: None,
            role_sub_allow: None,
            role_sub_deny: None,
            role_allow_response: None,
            role_allow_response_max: None,
            role_allow_response_ttl_secs: None,
            role_max_subscriptions: None,
            role_max_data: None,
            role_max_payload: None,
            role_ttl_secs: None,
            role_allowed_sources: None,
            role_allowed_connection_types: None,
            account_id: 1,
            account_name: "acme".into(),
            account_active: true,
            account_jetstream_disk: false,
            account_public_key: None,
            account_ttl_secs: None,
            signing_public_key: None,
            signing_seed: None,
            signing_key_pending: false,
        }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_permissions_anywhere_gives_defaults() {
        let m = merge(&login(), &Defaults::default());
        assert_eq!(m.publish.allow, v(&[">"]));
        assert_eq!(m.subscribe.allow, v(&[">"]));
        assert!(m.publish.deny.is_empty() && m.subscribe.deny.is_empty());
        assert_eq!(
            (m.max_subscriptions, m.max_data, m.max_payload),
            (-1, -1, -1)
        );
        assert_eq!(m.response, None);
    }

    #[test]
    fn role_and_user_lists_are_unioned_and_deduplicated() {
        let mut l = login();
        l.role_pub_allow = Some(v(&["sensors.>", "b"]));
        l.user_pub_allow = v(&["b", "a"]);
        l.role_sub_deny = Some(v(&["secret.>"]));
        l.user_sub_deny = v(&["private"]);
        l.user_sub_allow = v(&["_INBOX.>"]);
        let m = merge(&l, &Defaults::default());
        assert_eq!(m.publish.allow, v(&["a", "b", "sensors.>"]));
        assert_eq!(m.subscribe.deny, v(&["private", "secret.>"]));
        assert_eq!(m.subscribe.allow, v(&["_INBOX.>"]));
    }

    #[test]
    fn a_deny_alone_does_not_trigger_defaults() {
        let mut l = login();
        l.user_pub_deny = v(&["admin.>"]);
        let m = merge(&l, &Defaults::default());
        assert!(
            m.publish.allow.is_empty(),
            "no defaults once anything is set"
        );
        assert_eq!(m.publish.deny, v(&["admin.>"]));
    }

    #[test]
    fn limits_prefer_user_then_role_then_unlimited() {
        let mut l = login();
        l.role_max_payload = Some(1024);
        l.role_max_subscriptions = Some(10);
        l.user_max_subscriptions = Some(5);
        let m = merge(&l, &Defaults::default());
        assert_eq!(
            (m.max_subscriptions, m.max_data, m.max_payload),
            (5, -1, 1024)
        );
    }

    #[test]
    fn response_permission_zero_max_means_one() {
        let mut l = login();
        l.role_allow_response = Some(true);
        l.role_allow_response_max = Some(0);
        l.role_allow_response_ttl_secs = Some(5.0);
        let m = merge(&l, &Defaults::default());
        assert_eq!(
            m.response,
            Some(Response {
                max: 1,
                ttl: Duration::from_secs(5)
            })
        );
        l.role_allow_response_max = Some(-1);
        assert_eq!(merge(&l, &Defaults::default()).response.unwrap().max, -1);
    }

    #[test]
    fn ttl_precedence_and_cap() {
        let d = Duration::from_secs(3600);
        let max = Duration::from_secs(7200);
        let mut l = login();
        assert_eq!(ttl(&l, d, max), d);
        l.account_ttl_secs = Some(60.0);
        assert_eq!(ttl(&l, d, max), Duration::from_secs(60));
        l.role_ttl_secs = Some(30.0);
        assert_eq!(ttl(&l, d, max), Duration::from_secs(30));
        l.user_ttl_secs = Some(2.0);
        assert_eq!(ttl(&l, d, max), Duration::from_secs(2));
        l.user_ttl_secs = Some(86400.0 * 30.0);
        assert_eq!(ttl(&l, d, max), max);
    }

    /// `'infinity'` intervals (Postgres 17) and centuries arrive as huge or infinite seconds;
    /// `Duration::from_secs_f64` panics on them, which took the login task down.
    #[test]
    fn infinite_and_huge_intervals_saturate_instead_of_panicking() {
        let d = Duration::from_secs(3600);
        let max = Duration::from_secs(7200);
        for huge in [f64::INFINITY, 1e300, f64::MAX] {
            let mut l = login();
            l.account_ttl_secs = Some(huge);
            assert_eq!(ttl(&l, d, max), max, "{huge}");
            l.role_allow_response = Some(true);
            l.role_allow_response_ttl_secs = Some(huge);
            let r = merge(&l, &Defaults::default()).response.unwrap();
            assert_eq!(r.ttl, Duration::MAX, "{huge}");
        }
        let mut l = login();
        l.user_ttl_secs = Some(f64::NAN);
        l.role_ttl_secs = Some(f64::NEG_INFINITY);
        l.account_ttl_secs = Some(60.0);
        assert_eq!(
            ttl(&l, d, max),
            Duration::from_secs(60),
            "NaN and -inf are skipped"
        );
        assert_eq!(secs(Some(f64::NAN)), None);
        assert_eq!(secs(Some(0.0)), None);
        assert_eq!(secs(Some(1.5)), Some(Duration::from_millis(1500)));
    }

    /// MQTT `X/#` needs `X` as well as `X.>`: each `X.>` allow brings its parent, unless a
    /// deny covers the parent.
    #[test]
    fn mqtt_gets_the_parent_of_each_full_wildcard_allow() {
        let mut l = login();
        l.role_sub_allow = Some(v(&["sensors.>", "a.*.>", "exact", ">", "q.> grp"]));
        let m = merge(&l, &Defaults::default());
        let mqtt = for_mqtt(&m).expect("parents added");
        assert_eq!(
            mqtt.subscribe.allow,
            v(&[
                ">",
                "a.*",
                "a.*.>",
                "exact",
                "q.> grp",
                "sensors",
                "sensors.>"
            ])
        );
        assert_eq!(mqtt.publish, m.publish, "publish untouched");
        assert_eq!(mqtt.subscribe.deny, m.subscribe.deny);

        // Nothing to add: no copy.
        l.role_sub_allow = Some(v(&["sensors.in", "sensors", "sensors.>"]));
        assert_eq!(for_mqtt(&merge(&l, &Defaults::default())), None);

        // Deny wins: the parent itself, a wildcard over it, or `>`.
        l.role_sub_allow = Some(v(&["sensors.>", "a.b.>"]));
        for (deny, left) in [
            ("sensors", Some(v(&["a.b", "a.b.>", "sensors.>"]))),
            ("*", Some(v(&["a.b", "a.b.>", "sensors.>"]))),
            (">", None),
            ("a.*", Some(v(&["a.b.>", "sensors", "sensors.>"]))),
            ("a.>", Some(v(&["a.b.>", "sensors", "sensors.>"]))),
            ("a.b.c", Some(v(&["a.b", "a.b.>", "sensors", "sensors.>"]))),
            ("sensors.>", Some(v(&["a.b", "a.b.>", "sensors.>"]))),
            (
                "sensors.*",
                Some(v(&["a.b", "a.b.>", "sensors", "sensors.>"])),
            ),
            (
                "sensors grp",
                Some(v(&["a.b", "a.b.>", "sensors", "sensors.>"])),
            ),
        ] {
            l.role_sub_deny = Some(v(&[deny]));
            let got = for_mqtt(&merge(&l, &Defaults::default())).map(|m| m.subscribe.allow);
            assert_eq!(got, left, "deny {deny}");
        }
    }

    #[test]
    fn covers_follows_nats_wildcards() {
        assert!(covers("a", "a"));
        assert!(covers("*", "a"));
        assert!(covers(">", "a.b"));
        assert!(covers("a.>", "a.b.c"));
        assert!(covers("a.*", "a.*"));
        assert!(covers("a.>", "a.>"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("a.>", "a"));
        assert!(
            !covers("a.b", "a.*"),
            "a literal deny does not cover a wildcard"
        );
        assert!(!covers("a.*", "a.b.c"));
        assert!(!covers("a.b.c", "a.b"));
        assert!(!covers("b", "a"));
    }

    #[test]
    fn sources_and_connection_types() {
        let check = |l: &LoginRow, host, kind, ty| {
            check_connection(
                l.role_allowed_sources.as_deref(),
                l.role_allowed_connection_types.as_deref(),
                host,
                kind,
                ty,
            )
        };
        let mut l = login();
        assert!(check(&l, Some("10.1.2.3"), None, None).is_ok());
        l.role_allowed_sources = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(check(&l, Some("10.1.2.3"), None, None).is_ok());
        assert_eq!(
            check(&l, Some("127.0.0.1"), None, None),
            Err(ConnectionRule::SourceNotAllowed)
        );
        assert_eq!(
            check(&l, None, None, None),
            Err(ConnectionRule::SourceNotAllowed)
        );
        l.role_allowed_sources = None;
        l.role_allowed_connection_types = Some(v(&["WEBSOCKET"]));
        assert_eq!(
            check(&l, Some("127.0.0.1"), Some("Client"), Some("nats")),
            Err(ConnectionRule::ConnectionTypeNotAllowed)
        );
        assert!(check(&l, Some("127.0.0.1"), Some("Client"), Some("websocket")).is_ok());
    }
}
