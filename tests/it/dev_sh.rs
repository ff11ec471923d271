//! `scripts/dev.sh` stopped with Ctrl-C (issue 18 item 8): the terminal sends SIGINT to the
//! whole foreground process group, and `serve` must stop once, cleanly, not print "second
//! signal received; exiting without finishing" because the script's cleanup signalled it again.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::free_port;

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
    // Bounded; on failure, say what dev.sh printed (and stop what it started).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !out.lock().unwrap().contains("nats-pg-auth is running") {
        if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::TERM);
            let _ = child.wait();
            panic!(
                "dev.sh did not say it is running:\n{}\n{}\nnats log:\n{}",
                out.lock().unwrap(),
                err.lock().unwrap(),
                std::fs::read_to_string(dev.path().join("nats.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
