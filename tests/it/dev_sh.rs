//! `scripts/dev.sh` stopped with Ctrl-C (issue 18 item 8): the terminal sends SIGINT to the
//! whole foreground process group, and `serve` must stop once, cleanly, not print "second
//! signal received; exiting without finishing" because the script's cleanup signalled it again.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{free_port, wait_until};

/// Collects a pipe's text in a thread.
fn collect(mut from: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let into = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_dev_sh_without_a_second_signal() {
    // Under /tmp and traversable: as root, pg.sh runs the cluster as `postgres`.
    let dev = tempfile::Builder::new()
        .prefix("npa-dev.")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dev.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .env("DEV_DIR", dev.path())
        .env("NATS_PG_AUTH_BIN", env!("CARGO_BIN_EXE_nats-pg-auth"))
        .env("PG_PORT", free_port().to_string())
        .env("NATS_PORT", free_port().to_string())
        .env("WS_PORT", free_port().to_string())
        .env("MQTT_PORT", free_port().to_string())
        .env("HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env_remove("DATABASE_URL")
        // Its own process group, as a terminal's foreground job is.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/dev.sh");
    let pgid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let running = out.clone();
    wait_until(
        Duration::from_secs(60),
        "dev.sh to say it is running",
        || {
            let running = running.clone();
            async move { running.lock().unwrap().contains("nats-pg-auth is running") }
        },
    )
    .await;

    // Ctrl-C: SIGINT to the foreground process group.
    rustix::process::kill_process_group(pgid, rustix::process::Signal::INT).unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("dev.sh stops within 30s")
    .unwrap()
    .unwrap();
    let text = format!("{}\n{}", out.lock().unwrap(), err.lock().unwrap());
    assert!(text.contains("dev: stopping"), "{text}");
    assert!(!text.contains("second signal"), "{text}");
    assert!(
        text.contains("signal received; stopping"),
        "serve stopped cleanly: {text}"
    );
    assert!(
        !dev.path().join("pg/data/postmaster.pid").exists(),
        "Postgres stopped"
    );
    let _ = status;
}
