//! Every door, one row (design §7): the same `nats.users` row logs in over TCP, WebSocket (also
//! through nats-server's cookie options), MQTT and as a leaf node remote, with the same rights;
//! the role's `allowed_connection_types` is enforced at each door; deactivating the user closes
//! its connections on every door.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event};
use futures::{SinkExt, StreamExt};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event as MqttEvent, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

use crate::common::{
    client_options, free_port, is_auth_refusal, settle, wait_until, with_events, EnvOptions,
    NatsServer, TestEnv,
};

/// A test deployment whose server has every door open.
struct Doors {
    env: TestEnv,
    ws: u16,
    mqtt: u16,
    leaf: u16,
}

impl Doors {
    async fn start() -> Doors {
        Self::start_with("").await
    }

    /// `websocket_extra`: more lines of the `websocket {}` block (cookie options).
    async fn start_with(websocket_extra: &str) -> Doors {
        let (ws, mqtt, leaf) = (free_port(), free_port(), free_port());
        let env = TestEnv::start_with(EnvOptions {
            nats_extra: format!(
                "jetstream {{ store_dir: \"js\", max_memory_store: 67108864, max_file_store: 67108864 }}\n\
                 websocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n{websocket_extra}\n}}\n\
                 mqtt {{ listen: \"127.0.0.1:{mqtt}\" }}\n\
                 leafnodes {{ listen: \"127.0.0.1:{leaf}\" }}\n"
            ),
            ..Default::default()
        })
        .await;
        // acme has JetStream (MQTT needs it); alice and bob share the sensor role; watcher has
        // no role (the default permissions, `>`).
        env.sql(
            "INSERT INTO nats.accounts (name, max_jetstream_memory_storage, max_jetstream_disk_storage)
               VALUES ('acme', 4194304, 16777216);
             INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
               SELECT id, 'sensor', '{sensors.>}', '{sensors.>,_INBOX.>}' FROM nats.accounts WHERE name = 'acme';
             INSERT INTO nats.users (account_id, role_id, username, password_hash)
               SELECT a.id, r.id, u, crypt(p, gen_salt('bf', 4))
               FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id,
                    (VALUES ('alice', 's3cret'), ('bob', 'b0b')) AS v(u, p)
               WHERE a.name = 'acme';
             INSERT INTO nats.user_tokens (user_id, token_sha256, description)
               SELECT id, digest('alice-token', 'sha256'), 'device' FROM nats.users WHERE username = 'alice';",
        )
        .await;
        env.add_watcher("acme", "watcher").await;
        env.wait_synced("acme").await;
        Doors {
            env,
            ws,
            mqtt,
            leaf,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.ws)
    }

    async fn ws_user(&self, user: &str, pass: &str) -> Result<Client, async_nats::ConnectError> {
        client_options(ConnectOptions::with_user_and_password(
            user.into(),
            pass.into(),
        ))
        .connect(self.ws_url())
        .await
    }

    async fn ws_user_events(
        &self,
        user: &str,
        pass: &str,
    ) -> (Client, mpsc::UnboundedReceiver<Event>) {
        let (opts, rx) = with_events(client_options(ConnectOptions::with_user_and_password(
            user.into(),
            pass.into(),
        )));
        let client = opts.connect(self.ws_url()).await.expect("WebSocket login");
        (client, rx)
    }

    async fn watcher(&self) -> Client {
        self.env.connect_user("watcher", "pw").await.unwrap()
    }

    /// `$SYS.REQ.SERVER.PING.LEAFZ` on the hub: the accounts of its leaf connections.
    async fn leaf_accounts(&self) -> Vec<String> {
        let sys = self.env.system_client().await;
        let reply = sys
            .request("$SYS.REQ.SERVER.PING.LEAFZ", "{}".into())
            .await
            .expect("LEAFZ");
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        v["data"]["leafs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["account"].as_str().map(String::from))
            .collect()
    }

    /// A plain nats-server (no operator) whose leaf remote logs into the hub as `user`.
    async fn start_leaf(&self, name: &str, user: &str, pass: &str) -> (NatsServer, u16) {
        self.start_leaf_as(name, &format!("{user}:{pass}")).await
    }

    /// A leaf whose remote URL carries `userinfo` (`user:pass`, or a lone token: nats-server
    /// then sends it as `user` and `auth_token`, with no password).
    async fn start_leaf_as(&self, name: &str, userinfo: &str) -> (NatsServer, u16) {
        let port = free_port();
        let dir = self.env.dir.path().join(name);
        let conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
             leafnodes {{ reconnect: \"250ms\", remotes = [ {{ url: \"nats-leaf://{userinfo}@127.0.0.1:{} \" }} ] }}\n",
            self.leaf
        );
        (
            NatsServer::start_plain(port, Path::new(&dir), &conf).await,
            port,
        )
    }
}

/// Publishes `subject` from `from` until `sub` receives it (interest may take a moment to
/// reach another server or connection); panics after 5 s.
async fn deliver(from: &Client, subject: &str, sub: &mut async_nats::Subscriber) {
    let start = Instant::now();
    loop {
        from.publish(subject.to_owned(), "x".into()).await.unwrap();
        from.flush().await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            assert_eq!(m.subject.as_str(), subject);
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{subject} never arrived"
        );
    }
}

/// What the sensor role may do, asserted for one connection of alice (any door): publish and
/// subscribe on `sensors.>`, nothing else. `watcher` (TCP, `>`) is the other side.
async fn assert_sensor_rights(alice: &Client, watcher: &Client, tag: &str) {
    let mut all = watcher.subscribe(">").await.unwrap();
    settle(watcher).await;
    // Publish: the forbidden message is dropped, the allowed one after it arrives.
    alice
        .publish(format!("other.{tag}"), "no".into())
        .await
        .unwrap();
    alice
        .publish(format!("sensors.{tag}"), "yes".into())
        .await
        .unwrap();
    alice.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let m = all.next().await.unwrap();
            if !m.subject.starts_with("_INBOX.") {
                return m;
            }
        }
    })
    .await
    .expect("alice's allowed publish arrives");
    assert_eq!(
        m.subject.as_str(),
        format!("sensors.{tag}"),
        "{tag}: a publish outside the role went through"
    );
    // Subscribe: the allowed subscription gets messages, the forbidden one gets nothing.
    let mut denied = alice.subscribe(format!("other.{tag}")).await.unwrap();
    let mut allowed = alice.subscribe(format!("sensors.in.{tag}")).await.unwrap();
    alice.flush().await.unwrap();
    watcher
        .publish(format!("other.{tag}"), "no".into())
        .await
        .unwrap();
    deliver(watcher, &format!("sensors.in.{tag}"), &mut allowed).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), denied.next())
            .await
            .ok()
            .flatten()
            .is_none(),
        "{tag}: a subscription outside the role got a message"
    );
}

#[tokio::test]
async fn websocket_logins_have_the_same_rights_as_tcp() {
    let d = Doors::start().await;
    let watcher = d.watcher().await;
    let tcp = d.env.connect_user("alice", "s3cret").await.unwrap();
    assert_sensor_rights(&tcp, &watcher, "tcp").await;
    let ws = d
        .ws_user("alice", "s3cret")
        .await
        .expect("password over WebSocket");
    assert_sensor_rights(&ws, &watcher, "ws").await;
    let ws_token = client_options(ConnectOptions::with_token("alice-token".into()))
        .connect(d.ws_url())
        .await
        .expect("token over WebSocket");
    assert_sensor_rights(&ws_token, &watcher, "wstoken").await;
    // Refusals are the same too.
    let err = d
        .ws_user("alice", "wrong")
        .await
        .expect_err("wrong password");
    assert!(is_auth_refusal(&err), "{err}");
    assert_eq!(d.env.metrics.denied("bad_password"), 1);
    // WebSocket connections are in CONNZ under the username, like TCP ones (the kicks rely on it).
    let users = d.env.connected_users("acme").await;
    assert_eq!(
        users.iter().filter(|u| *u == "alice").count(),
        3,
        "{users:?}"
    );
}

/// A hand-driven NATS-over-WebSocket client that sends a `Cookie` header (async-nats cannot),
/// logs in with no credentials in CONNECT, and asks `$SYS.REQ.USER.INFO` who it is. Returns
/// the USER.INFO data, or the server's `-ERR`.
async fn cookie_login(port: u16, cookie: &str) -> Result<serde_json::Value, String> {
    let (mut ws, _) = tokio_websockets::ClientBuilder::new()
        .uri(&format!("ws://127.0.0.1:{port}"))
        .unwrap()
        .add_header(
            http::header::COOKIE,
            http::HeaderValue::from_str(cookie).unwrap(),
        )
        .unwrap()
        .connect()
        .await
        .expect("WebSocket handshake");
    let mut got = String::new();
    let mut sent = false;
    let exchange = async {
        while let Some(frame) = ws.next().await {
            let Ok(frame) = frame else { break };
            if frame.is_close() {
                break;
            }
            got.push_str(&String::from_utf8_lossy(frame.as_payload()));
            if !sent && got.contains("INFO ") && got.contains("\r\n") {
                sent = true;
                let cmds = "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n\
                            SUB _INBOX.cookie 1\r\nPUB $SYS.REQ.USER.INFO _INBOX.cookie 0\r\n\r\n";
                ws.send(tokio_websockets::Message::binary(cmds.as_bytes().to_vec()))
                    .await
                    .unwrap();
            }
            if let Some(at) = got.find("MSG _INBOX.cookie 1 ") {
                let rest = &got[at..];
                let mut lines = rest.split("\r\n");
                lines.next();
                if let Some(body) = lines.next().filter(|b| b.ends_with('}')) {
                    let v: serde_json::Value = serde_json::from_str(body).unwrap();
                    return Ok(v["data"].clone());
                }
            }
            if let Some(at) = got.find("-ERR") {
                return Err(got[at..].lines().next().unwrap_or("").to_owned());
            }
        }
        Err(format!("connection ended: {got:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("cookie login answered")
}

#[tokio::test]
async fn websocket_cookie_logins_are_checked_by_the_callout() {
    let d = Doors::start_with("  user_cookie: \"nuser\"\n  pass_cookie: \"npass\"").await;
    let acme = d.env.account_key("acme").await;
    let info = cookie_login(d.ws, "theme=dark; nuser=watcher; npass=pw")
        .await
        .expect("cookie login");
    assert_eq!(info["account"], acme.as_str(), "{info}");
    let err = cookie_login(d.ws, "nuser=watcher; npass=nope")
        .await
        .expect_err("wrong cookie password");
    assert!(err.contains("Authorization Violation"), "{err}");
    assert_eq!(d.env.metrics.denied("bad_password"), 1);
    let err = cookie_login(d.ws, "theme=dark")
        .await
        .expect_err("no cookie");
    assert!(err.contains("Authorization Violation"), "{err}");
    assert_eq!(d.env.metrics.denied("no_credentials"), 1);
}

#[tokio::test]
async fn websocket_token_cookie_logins_are_checked_by_the_callout() {
    let d = Doors::start_with("  token_cookie: \"ntoken\"").await;
    d.env
        .sql(
            "INSERT INTO nats.user_tokens (user_id, token_sha256, description)
               SELECT id, digest('watcher-token', 'sha256'), 'browser' FROM nats.users WHERE username = 'watcher'",
        )
        .await;
    let acme = d.env.account_key("acme").await;
    let info = cookie_login(d.ws, "theme=dark; ntoken=watcher-token")
        .await
        .expect("token cookie login");
    assert_eq!(info["account"], acme.as_str(), "{info}");
    let err = cookie_login(d.ws, "ntoken=not-a-token")
        .await
        .expect_err("unknown token cookie");
    assert!(err.contains("Authorization Violation"), "{err}");
    assert_eq!(d.env.metrics.denied("unknown_token"), 1);
}

/// Sets the sensor role's connection types.
async fn allow_types(env: &TestEnv, types: &str) {
    env.sql(&format!(
        "UPDATE nats.roles SET allowed_connection_types = '{types}' WHERE name = 'sensor'"
    ))
    .await;
}

#[tokio::test]
async fn allowed_connection_types_open_only_the_listed_doors() {
    let d = Doors::start().await;
    allow_types(&d.env, "{WEBSOCKET}").await;
    let url = d.ws_url();
    wait_until(Duration::from_secs(5), "TCP refused", || async {
        d.env.connect_user("alice", "s3cret").await.is_err()
    })
    .await;
    assert!(d.env.metrics.denied("connection_type_not_allowed") >= 1);
    d.ws_user("alice", "s3cret")
        .await
        .unwrap_or_else(|e| panic!("WebSocket at {url}: {e}"));
    assert!(mqtt_connect(d.mqtt, "a1", "alice", "s3cret").await.is_err());

    allow_types(&d.env, "{STANDARD}").await;
    wait_until(Duration::from_secs(5), "TCP allowed", || async {
        d.env.connect_user("alice", "s3cret").await.is_ok()
    })
    .await;
    let before = d.env.metrics.denied("connection_type_not_allowed");
    let err = d
        .ws_user("alice", "s3cret")
        .await
        .expect_err("WebSocket refused");
    assert!(is_auth_refusal(&err));
    assert_eq!(
        d.env.metrics.denied("connection_type_not_allowed"),
        before + 1
    );

    allow_types(&d.env, "{MQTT}").await;
    wait_until(Duration::from_secs(5), "TCP refused", || async {
        d.env.connect_user("alice", "s3cret").await.is_err()
    })
    .await;
    mqtt_connect(d.mqtt, "a2", "alice", "s3cret")
        .await
        .expect("MQTT allowed");
    assert!(d.ws_user("alice", "s3cret").await.is_err());
}

#[tokio::test]
async fn leafnode_connection_type_rule() {
    let d = Doors::start().await;
    let acme = d.env.account_key("acme").await;
    allow_types(&d.env, "{STANDARD}").await;
    // The rule must have reached the login copy before the leaf dials (else the leaf gets in
    // unrestricted and, connected, never retries): WebSocket being refused shows it has.
    wait_until(Duration::from_secs(5), "the rule in the copy", || async {
        d.ws_user("alice", "s3cret").await.is_err()
    })
    .await;
    let before = d.env.metrics.denied("connection_type_not_allowed");
    let (_leaf, _) = d.start_leaf("leaf_std", "alice", "s3cret").await;
    wait_until(Duration::from_secs(5), "the leaf to be refused", || async {
        d.env.metrics.denied("connection_type_not_allowed") > before
    })
    .await;
    assert!(d.leaf_accounts().await.is_empty());
    allow_types(&d.env, "{LEAFNODE}").await;
    // The leaf retries by itself and now gets in; plain clients do not.
    wait_until(Duration::from_secs(5), "the leaf to join", || async {
        d.leaf_accounts().await == vec![acme.clone()]
    })
    .await;
    wait_until(Duration::from_secs(5), "TCP refused", || async {
        d.env.connect_user("alice", "s3cret").await.is_err()
    })
    .await;
}

// ---- MQTT ------------------------------------------------------------------------------------

/// A connected MQTT 3.1.1 client; its event loop runs in a task.
struct Mqtt {
    client: AsyncClient,
    /// (topic, payload) of every PUBLISH received.
    msgs: mpsc::UnboundedReceiver<(String, String)>,
    subacks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
    /// Gets a value when the connection ends.
    closed: mpsc::UnboundedReceiver<String>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// Connects; Err with the CONNACK code or the connection error.
async fn mqtt_connect(port: u16, id: &str, user: &str, pass: &str) -> Result<Mqtt, String> {
    mqtt_connect_with(port, id, user, pass, true).await
}

/// `clean: false` keeps the MQTT session (subscriptions, QoS 1 messages) across connections.
async fn mqtt_connect_with(
    port: u16,
    id: &str,
    user: &str,
    pass: &str,
    clean: bool,
) -> Result<Mqtt, String> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, pass);
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 16);
    let connack = async {
        loop {
            match el.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("{:?}", a.code))
                    }
                }
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), connack)
        .await
        .map_err(|_| "no CONNACK".to_owned())??;
    let (mtx, msgs) = mpsc::unbounded_channel();
    let (stx, subacks) = mpsc::unbounded_channel();
    let (ctx, closed) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let _ = mtx.send((p.topic, String::from_utf8_lossy(&p.payload).into()));
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(s))) => {
                    let _ = stx.send(s.return_codes);
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = ctx.send(e.to_string());
                    return;
                }
            }
        }
    });
    Ok(Mqtt {
        client,
        msgs,
        subacks,
        closed,
        _task: task,
    })
}

impl Mqtt {
    async fn subscribe(&mut self, topic: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), self.subacks.recv())
            .await
            .expect("SUBACK")
            .expect("connection open")
    }

    /// Waits for a message on `topic` (others are skipped and returned).
    async fn receive(&mut self, topic: &str) -> (String, Vec<String>) {
        let mut skipped = Vec::new();
        let got = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let (t, p) = self.msgs.recv().await.expect("connection open");
                if t == topic {
                    return p;
                }
                skipped.push(t);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no MQTT message on {topic}"));
        (got, skipped)
    }
}

#[tokio::test]
async fn mqtt_password_login_gets_the_roles_rights() {
    let d = Doors::start().await;
    let watcher = d.watcher().await;
    let mut nats_sensors = watcher.subscribe("sensors.>").await.unwrap();
    let mut nats_other = watcher.subscribe("other.x").await.unwrap();
    settle(&watcher).await;
    let mut alice = mqtt_connect(d.mqtt, "alice-dev", "alice", "s3cret")
        .await
        .expect("MQTT user/password login (the server also sets auth_token)");
    // Subscribe within the role (QoS 1 needs the server's `$MQTT.sub.` delivery subjects,
    // which nats-server allows MQTT clients by itself), and outside it.
    assert!(matches!(
        alice.subscribe("sensors/t1").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    assert_eq!(
        alice.subscribe("other/y").await,
        vec![SubscribeReasonCode::Failure],
        "a subscription outside the role is refused"
    );
    // MQTT publish: topic sensors/t1 is NATS subject sensors.t1; outside the role dropped.
    alice
        .client
        .publish("other/x", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    alice
        .client
        .publish("sensors/t1", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), nats_sensors.next())
        .await
        .expect("a NATS client of acme sees alice's MQTT publish")
        .unwrap();
    assert_eq!(m.subject.as_str(), "sensors.t1");
    assert_eq!(&m.payload[..], b"hello");
    // NATS to MQTT: the message after a forbidden one arrives, the forbidden one does not.
    watcher.publish("other.y", "no".into()).await.unwrap();
    watcher
        .publish("sensors.t1", "from-nats".into())
        .await
        .unwrap();
    loop {
        let (payload, skipped) = alice.receive("sensors/t1").await;
        assert!(skipped.is_empty(), "outside the role: {skipped:?}");
        if payload == "from-nats" {
            break;
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), nats_other.next())
            .await
            .is_err(),
        "alice's publish outside the role reached NATS"
    );
    // Counted as a password login, and listed in CONNZ under the username.
    assert_eq!(d.env.metrics.denied("unknown_token"), 0);
    assert!(d
        .env
        .connected_users("acme")
        .await
        .contains(&"alice".to_owned()));
}

/// MQTT's `X/#` also matches `X` itself, so nats-server subscribes both `X` and `X.>` for it
/// and refuses the SUBACK unless both are allowed. A role granting `sensors.>` (the docs' and
/// dev.sh's example) must let a device subscribe `sensors/#`: MQTT logins get the parent
/// `sensors` too, a subscribe deny on it still wins, and NATS logins of the same user do not get it.
#[tokio::test]
async fn mqtt_hash_under_a_full_wildcard_grant() {
    let d = Doors::start().await;
    let watcher = d.watcher().await;
    let mut alice = mqtt_connect(d.mqtt, "alice-hash", "alice", "s3cret")
        .await
        .expect("MQTT login");
    assert!(
        matches!(
            alice.subscribe("sensors/#").await[..],
            [SubscribeReasonCode::Success(_)]
        ),
        "sensors/# under a role granting sensors.>"
    );
    // Both levels arrive: a subject below `sensors` and `sensors` itself.
    for (subject, topic) in [("sensors.t1", "sensors/t1"), ("sensors", "sensors")] {
        let start = Instant::now();
        loop {
            watcher.publish(subject, subject.into()).await.unwrap();
            watcher.flush().await.unwrap();
            let got = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    match alice.msgs.recv().await {
                        Some((t, _)) if t == topic => return,
                        Some(_) => continue,
                        None => panic!("MQTT connection closed"),
                    }
                }
            })
            .await;
            if got.is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{subject} never reached the MQTT subscription sensors/#"
            );
        }
    }

    // A TCP login of the same user is not granted `sensors`: its subscription gets nothing
    // while one on `sensors.t2` after it does.
    let tcp = d.env.connect_user("alice", "s3cret").await.unwrap();
    let mut parent = tcp.subscribe("sensors").await.unwrap();
    let mut below = tcp.subscribe("sensors.t2").await.unwrap();
    tcp.flush().await.unwrap();
    watcher.publish("sensors", "no".into()).await.unwrap();
    deliver(&watcher, "sensors.t2", &mut below).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), parent.next())
            .await
            .ok()
            .flatten()
            .is_none(),
        "a NATS login got sensors from a sensors.> grant"
    );

    // Deny wins: with `sensors` denied to bob, his `sensors/#` is refused, `sensors/t1` is not.
    d.env
        .sql(
            "UPDATE nats.users SET subscribe_deny_permissions = '{sensors}' WHERE username = 'bob'",
        )
        .await;
    let mut bob = mqtt_connect(d.mqtt, "bob-hash", "bob", "b0b")
        .await
        .expect("MQTT login");
    assert_eq!(
        bob.subscribe("sensors/#").await,
        vec![SubscribeReasonCode::Failure],
        "a denied parent still refuses sensors/#"
    );
    assert!(matches!(
        bob.subscribe("sensors/t1").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
}

/// What MQTT needs beyond the role's topics: nothing. Persistent sessions, QoS 1 messages
/// kept while offline and retained messages all live in the account's JetStream, managed by
/// the server itself; the deliveries to the client come on `$MQTT.sub.` /
/// `$MQTT.deliver.pubrel.` subjects that nats-server allows MQTT clients without a grant
/// (server/client.go). The role grants only `sensors.>` (and `_INBOX.>`).
#[tokio::test]
async fn mqtt_sessions_and_retained_messages_need_only_the_topics() {
    let d = Doors::start().await;
    let mut alice = mqtt_connect_with(d.mqtt, "alice-keep", "alice", "s3cret", false)
        .await
        .unwrap();
    assert!(matches!(
        alice.subscribe("sensors/kept").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    alice.client.disconnect().await.unwrap();
    wait_until(
        Duration::from_secs(3),
        "alice's MQTT client gone",
        || async {
            !d.env
                .connected_users("acme")
                .await
                .contains(&"alice".to_owned())
        },
    )
    .await;
    // While alice is away, from bob's MQTT client: a QoS 1 message for her session (only
    // MQTT QoS 1 publishes are stored for sessions; a plain NATS publish is not), and a
    // retained one.
    let bob = mqtt_connect(d.mqtt, "bob-dev", "bob", "b0b").await.unwrap();
    bob.client
        .publish("sensors/kept", QoS::AtLeastOnce, false, "while-away")
        .await
        .unwrap();
    bob.client
        .publish("sensors/status", QoS::AtLeastOnce, true, "retained")
        .await
        .unwrap();
    let mut alice = mqtt_connect_with(d.mqtt, "alice-keep", "alice", "s3cret", false)
        .await
        .expect("alice back, same session");
    let (payload, _) = alice.receive("sensors/kept").await;
    assert_eq!(
        payload, "while-away",
        "the QoS 1 message kept in her session"
    );
    // The retained message reaches a later subscriber (retry: bob's publish may still be on
    // its way to the retained-message stream).
    let start = Instant::now();
    loop {
        assert!(matches!(
            alice.subscribe("sensors/status").await[..],
            [SubscribeReasonCode::Success(_)]
        ));
        if let Ok(Some((t, p))) =
            tokio::time::timeout(Duration::from_millis(300), alice.msgs.recv()).await
        {
            assert_eq!((t.as_str(), p.as_str()), ("sensors/status", "retained"));
            break;
        }
        alice.client.unsubscribe("sensors/status").await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no retained message"
        );
    }
    assert_eq!(d.env.metrics.denied("connection_type_not_allowed"), 0);
}

#[tokio::test]
async fn mqtt_refusals_wrong_password_garbage_and_no_jetstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Doors::start().await;
    let err = mqtt_connect(d.mqtt, "a", "alice", "wrong")
        .await
        .err()
        .expect("wrong password refused");
    eprintln!("wrong MQTT password: {err}");
    assert_eq!(
        d.env.metrics.denied("bad_password"),
        1,
        "counted toward the lockout"
    );
    // Garbage, and a CONNECT that lies about its length: closed by the server, no callout.
    for junk in [
        &b"\x10\xff\xff\xff\xff\x7fMQTT\x04\xc2"[..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &b"\x10\x0c\x00\x04MQTT\x04\xc2\x00\x05\x00\x00\x00\x00\x00\x00"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", d.mqtt))
            .await
            .unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the server answers or closes");
        // Either closed, or a refusing CONNACK (0x20, len 2, flags, code != 0).
        if let Ok(n) = read {
            assert!(n == 0 || (buf[0] == 0x20 && buf[3] != 0), "{:?}", &buf[..n]);
        }
    }
    assert!(d.env.callout.as_ref().unwrap().is_serving());
    mqtt_connect(d.mqtt, "a", "alice", "s3cret")
        .await
        .expect("the next good login still works");
    // An account without JetStream: refused with a reason that says what to set.
    d.env
        .sql(
            "INSERT INTO nats.accounts (name) VALUES ('nojs');
             INSERT INTO nats.users (account_id, username, password_hash)
               SELECT id, 'carol', crypt('c', gen_salt('bf', 4)) FROM nats.accounts WHERE name = 'nojs';",
        )
        .await;
    d.env.wait_synced("nojs").await;
    // A CONNACK refusal (without the check, the server admits the login, then drops the socket
    // without a CONNACK: "JetStream not enabled for account" in its log only).
    let err = mqtt_connect(d.mqtt, "c", "carol", "c")
        .await
        .err()
        .expect("refused");
    assert!(err.contains("NotAuthorized"), "{err}");
    assert_eq!(d.env.metrics.denied("mqtt_needs_jetstream"), 1);
    d.env
        .connect_user("carol", "c")
        .await
        .expect("carol still logs in over TCP");
    // Memory storage alone is not enough: nats-server keeps MQTT sessions in file streams
    // ("insufficient storage resources available" in its log, no CONNACK, without the check).
    d.env
        .sql("UPDATE nats.accounts SET max_jetstream_memory_storage = 4194304 WHERE name = 'nojs'")
        .await;
    d.env.wait_synced("nojs").await;
    wait_until(
        Duration::from_secs(5),
        "the memory-only refusal",
        || async {
            mqtt_connect(d.mqtt, "c", "carol", "c").await.is_err()
                && d.env.metrics.denied("mqtt_needs_jetstream") >= 2
        },
    )
    .await;
    // File storage lets carol's MQTT client in (the copy follows the account row).
    d.env
        .sql("UPDATE nats.accounts SET max_jetstream_disk_storage = 4194304 WHERE name = 'nojs'")
        .await;
    wait_until(Duration::from_secs(5), "carol's MQTT login", || async {
        mqtt_connect(d.mqtt, "c", "carol", "c").await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn mqtt_token_in_the_password_field() {
    let d = Doors::start().await;
    // Any username that is not a user: the password is tried as a token.
    mqtt_connect(d.mqtt, "dev17", "device", "alice-token")
        .await
        .expect("token in the MQTT password field");
    // A wrong one is an unknown user's wrong password, as over TCP (a dummy hash, counted
    // toward that username's lockout: 10 failures by default) ...
    for i in 0..11 {
        assert!(
            mqtt_connect(d.mqtt, &format!("bad{i}"), "device", "not-a-token")
                .await
                .is_err()
        );
    }
    assert_eq!(d.env.metrics.denied("unknown_user"), 10);
    assert_eq!(d.env.metrics.denied("locked_out"), 1);
    assert_eq!(d.env.metrics.denied("unknown_token"), 0);
    // ... but bad tokens under a shared device username do not lock the good ones out.
    mqtt_connect(d.mqtt, "dev18", "device", "alice-token")
        .await
        .expect("a valid token despite the username's lockout");
    // A username that is a user is a password login, token or not.
    assert!(mqtt_connect(d.mqtt, "dev19", "alice", "alice-token")
        .await
        .is_err());
    assert_eq!(d.env.metrics.denied("bad_password"), 1);
    // Revoked: refused as such.
    d.env
        .sql("UPDATE nats.user_tokens SET revoked_at = now() WHERE description = 'device'")
        .await;
    wait_until(
        Duration::from_secs(5),
        "the revoked token refused",
        || async {
            mqtt_connect(d.mqtt, "dev20", "device", "alice-token")
                .await
                .is_err()
        },
    )
    .await;
    assert!(d.env.metrics.denied("token_revoked") >= 1);
}

#[tokio::test]
async fn a_user_bound_to_mqtt_client_ids_uses_only_those() {
    let d = Doors::start().await;
    d.env
        .sql("UPDATE nats.users SET mqtt_client_ids = '{alice-dev,alice-spare}' WHERE username = 'alice'")
        .await;
    // The server sends the CONNECT's client id as client_info.mqtt_id; others are refused.
    wait_until(
        Duration::from_secs(5),
        "another client id refused",
        || async {
            mqtt_connect(d.mqtt, "bobs-device", "alice", "s3cret")
                .await
                .is_err()
        },
    )
    .await;
    assert!(d.env.metrics.denied("mqtt_client_id_not_allowed") >= 1);
    mqtt_connect(d.mqtt, "alice-dev", "alice", "s3cret")
        .await
        .expect("a listed client id");
    // Other doors and unbound users are not concerned.
    d.env.connect_user("alice", "s3cret").await.expect("TCP");
    mqtt_connect(d.mqtt, "anything", "bob", "b0b")
        .await
        .expect("bob has no binding");
    let err = d
        .env
        .sql_err("UPDATE nats.users SET mqtt_client_ids = '{\"\"}' WHERE username = 'bob'")
        .await;
    assert!(err.contains("user_mqtt_client_ids_bounds"), "{err}");
}

// ---- Leaf nodes ------------------------------------------------------------------------------

#[tokio::test]
async fn a_leaf_node_joins_as_the_user_and_carries_messages_both_ways() {
    let d = Doors::start().await;
    let acme = d.env.account_key("acme").await;
    let (_bad, _) = d.start_leaf("leaf_bad", "alice", "wrong").await;
    wait_until(
        Duration::from_secs(5),
        "the bad leaf to be refused",
        || async { d.env.metrics.denied("bad_password") >= 1 },
    )
    .await;
    assert!(
        d.leaf_accounts().await.is_empty(),
        "no leaf with a wrong password"
    );
    drop(_bad);

    let (_leaf, leaf_port) = d.start_leaf("leaf_ok", "alice", "s3cret").await;
    wait_until(Duration::from_secs(5), "the leaf to join", || async {
        d.leaf_accounts().await == vec![acme.clone()]
    })
    .await;
    // A local client of the leaf (no credentials: the leaf's own clients are not checked by
    // the hub's callout) shares alice's account and rights on the hub.
    let local = async_nats::connect(format!("nats://127.0.0.1:{leaf_port}"))
        .await
        .unwrap();
    let watcher = d.watcher().await;
    let mut down = local.subscribe("sensors.down").await.unwrap();
    local.flush().await.unwrap();
    deliver(&watcher, "sensors.down", &mut down).await;
    let mut up = watcher.subscribe("sensors.up").await.unwrap();
    watcher.flush().await.unwrap();
    deliver(&local, "sensors.up", &mut up).await;
    // Outside alice's role: does not cross.
    let mut other = watcher.subscribe("other.up").await.unwrap();
    settle(&watcher).await;
    local.publish("other.up", "no".into()).await.unwrap();
    deliver(&local, "sensors.up", &mut up).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), other.next())
            .await
            .is_err(),
        "the leaf published outside alice's role"
    );
}

// ---- One row, every door: kicks --------------------------------------------------------------

#[tokio::test]
async fn deactivating_a_user_closes_it_on_every_door() {
    let d = Doors::start().await;
    let acme = d.env.account_key("acme").await;
    let (_w, mut wevents) = d.env.connect_user_events("watcher", "pw").await.unwrap();
    let mut bob = mqtt_connect(d.mqtt, "bob-dev", "bob", "b0b").await.unwrap();
    let (_tcp, mut tcp) = d.env.connect_user_events("alice", "s3cret").await.unwrap();
    let (_ws, mut ws) = d.ws_user_events("alice", "s3cret").await;
    let mut mqtt = mqtt_connect(d.mqtt, "alice-dev", "alice", "s3cret")
        .await
        .unwrap();
    let (_leaf, _) = d.start_leaf("leaf_kick", "alice", "s3cret").await;
    wait_until(Duration::from_secs(5), "the leaf to join", || async {
        d.leaf_accounts().await == vec![acme.clone()]
    })
    .await;
    // Every door's connection is in CONNZ under the username, the leaf's too (kind Leafnode;
    // nats-server >= 2.12): that is how the kicks find them.
    let users = d.env.connected_users("acme").await;
    assert_eq!(
        users.iter().filter(|u| *u == "alice").count(),
        4,
        "TCP, WebSocket, MQTT and leaf in CONNZ as alice: {users:?}"
    );

    let start = Instant::now();
    d.env
        .sql("UPDATE nats.users SET active = false WHERE username = 'alice'")
        .await;
    let limit = Duration::from_secs(2);
    let closed = |events: &mut mpsc::UnboundedReceiver<Event>| {
        while let Ok(e) = events.try_recv() {
            if matches!(e, Event::Disconnected) {
                return true;
            }
        }
        false
    };
    let (mut t_tcp, mut t_ws, mut t_mqtt, mut t_leaf) = (None, None, None, None);
    while start.elapsed() < limit + Duration::from_millis(500) {
        if t_tcp.is_none() && closed(&mut tcp) {
            t_tcp = Some(start.elapsed());
        }
        if t_ws.is_none() && closed(&mut ws) {
            t_ws = Some(start.elapsed());
        }
        if t_mqtt.is_none() && mqtt.closed.try_recv().is_ok() {
            t_mqtt = Some(start.elapsed());
        }
        if t_leaf.is_none() && d.leaf_accounts().await.is_empty() {
            t_leaf = Some(start.elapsed());
        }
        if t_tcp.and(t_ws).and(t_mqtt).and(t_leaf).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("kick latency: tcp {t_tcp:?} websocket {t_ws:?} mqtt {t_mqtt:?} leaf {t_leaf:?}");
    for (door, t) in [
        ("tcp", t_tcp),
        ("websocket", t_ws),
        ("mqtt", t_mqtt),
        ("leaf", t_leaf),
    ] {
        assert!(
            t.is_some_and(|t| t <= limit),
            "{door}: not closed within {limit:?} ({t:?})"
        );
    }
    // Others untouched.
    while let Ok(e) = wevents.try_recv() {
        assert!(
            !matches!(e, Event::Disconnected),
            "watcher was disconnected"
        );
    }
    assert!(
        bob.closed.try_recv().is_err(),
        "bob's MQTT connection was closed"
    );
    assert!(matches!(
        bob.subscribe("sensors/bob").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    // The leaf stays out while alice is inactive.
    assert!(d.leaf_accounts().await.is_empty());
}

/// A leaf remote URL with a lone token (`nats-leaf://TOKEN@hub`) logs in with that token;
/// an unknown one keeps the leaf out.
#[tokio::test]
async fn a_leaf_node_joins_with_a_token() {
    let d = Doors::start().await;
    let acme = d.env.account_key("acme").await;
    let (bad, _) = d.start_leaf_as("leaf_badtok", "no-such-token").await;
    wait_until(Duration::from_secs(5), "the leaf to be refused", || async {
        d.env.metrics.denied("unknown_token") >= 1
    })
    .await;
    assert!(
        d.leaf_accounts().await.is_empty(),
        "no leaf with a bad token"
    );
    drop(bad);
    let (_leaf, _) = d.start_leaf_as("leaf_tok", "alice-token").await;
    wait_until(
        Duration::from_secs(5),
        "the token leaf to join acme",
        || async { d.leaf_accounts().await == vec![acme.clone()] },
    )
    .await;
}
