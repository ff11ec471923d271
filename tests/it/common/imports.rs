//! Checks shared by the import tests (nats.conf, nsc and pb-nats sources): what a migrated
//! deployment's clients may and may not do.

use std::time::Duration;

use async_nats::{Client, Event, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{expect_violation, settle};

/// The next message on `watch` (3 s at most) is on `subject`; `label` names the publish in the
/// panic message ("{what}: {label} was not delivered").
pub async fn delivered_on(watch: &mut Subscriber, subject: &str, what: &str, label: &str) {
    let msg = tokio::time::timeout(Duration::from_secs(3), watch.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: {label} was not delivered"))
        .unwrap();
    assert_eq!(msg.subject.as_str(), subject, "{what}");
}

/// A publish on `subject` is refused with a permissions violation.
pub async fn publish_is_violation(
    client: &Client,
    events: &mut mpsc::UnboundedReceiver<Event>,
    subject: &str,
    payload: &'static str,
) {
    client
        .publish(subject.to_string(), payload.into())
        .await
        .unwrap();
    expect_violation(events, subject).await;
}

/// A subscribe on `subject` is refused with a permissions violation; the subscription is
/// handed back so that the caller keeps it for as long as it did before.
pub async fn subscribe_is_violation(
    client: &Client,
    events: &mut mpsc::UnboundedReceiver<Event>,
    subject: &str,
) -> Subscriber {
    let sub = client.subscribe(subject.to_string()).await.unwrap();
    expect_violation(events, subject).await;
    sub
}

/// `alice` serves svc.echo, `bob` asks `echo` through his import; the answer comes back within
/// 10 s (retried every 500 ms until alice's subscription is in place). With `settle_alice`, her
/// subscription is first flushed with [`settle`], which needs her to be allowed her own inbox
/// (pb-nats's alice is; the nsc and nats.conf fixtures' alice is not).
pub async fn service_answers(alice: &Client, bob: &Client, what: &str, settle_alice: bool) {
    let mut service = alice.subscribe("svc.echo").await.unwrap();
    if settle_alice {
        settle(alice).await;
    }
    let responder = tokio::spawn({
        let alice = alice.clone();
        async move {
            while let Some(m) = service.next().await {
                if let Some(reply) = m.reply {
                    let _ = alice.publish(reply, m.payload).await;
                }
            }
        }
    });
    let mut answered = None;
    let start = std::time::Instant::now();
    while answered.is_none() && start.elapsed() < Duration::from_secs(10) {
        if let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_millis(500),
            bob.request("echo", "ping".into()),
        )
        .await
        {
            answered = Some(reply);
        }
    }
    responder.abort();
    let reply =
        answered.unwrap_or_else(|| panic!("{what}: the cross-account service did not answer"));
    assert_eq!(&reply.payload[..], b"ping");
}

/// An import run refused with exit code 64, nothing on stdout and one line on stderr that
/// contains `want`.
pub fn refused_with_one_line(what: &str, code: Option<i32>, out: &str, err: &str, want: &str) {
    assert_eq!(code, Some(64), "{what}: {out}{err}");
    assert!(out.is_empty(), "{what}: {out}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    assert!(err.contains(want), "{what}: {err}");
}

/// How many seeds (service identities and account keys) are stored without the at-rest seal.
pub async fn unsealed_seeds(env: &crate::common::TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT seed FROM nats.service_identities
                               UNION ALL SELECT seed FROM nats.account_keys WHERE seed IS NOT NULL) s
         WHERE seed NOT LIKE 'enc:%'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}
