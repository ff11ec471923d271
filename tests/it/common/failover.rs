//! A Postgres failover of the test's own: a streaming standby of a [`PgProcess`] (made with
//! `pg_basebackup -R`, started with `scripts/pg.sh`), and a TCP proxy the service connects
//! through, switched from the primary to the promoted standby as HAProxy or a Kubernetes
//! Service would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{free_port, PgProcess};

const PGBIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PGBIN}/{program}")]);
    cmd
}

fn run(mut cmd: std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgProcess {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A streaming standby of this (running) cluster on its own port, started and replaying.
    pub async fn standby(&self) -> PgProcess {
        let dir = tempfile::Builder::new()
            .prefix("npa-pg.")
            .tempdir_in("/tmp")
            .unwrap();
        run(
            {
                let mut c = std::process::Command::new("chown");
                c.args(["postgres:postgres"]).arg(dir.path());
                c
            },
            "chown the standby directory",
        );
        let data = dir.path().join("data");
        let mut backup = as_postgres("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-X", "stream", "-R", "-c", "fast", "-D"])
            .arg(&data);
        run(backup, "pg_basebackup");
        // Its own socket directory (the copied configuration names the primary's).
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .unwrap();
        use std::io::Write as _;
        writeln!(conf, "unix_socket_directories = '{}'", dir.path().display()).unwrap();
        let standby = PgProcess {
            port: free_port(),
            dir,
        };
        standby.start_again().await;
        standby
    }

    /// Stops it at once (`pg_ctl -m immediate`): what a crashed primary looks like.
    pub fn stop_immediately(&self) {
        let mut stop = as_postgres("pg_ctl");
        stop.args(["-m", "immediate", "-w", "-D"])
            .arg(self.data())
            .arg("stop");
        run(stop, "pg_ctl stop -m immediate");
    }

    /// Promotes this standby and waits until it accepts writes.
    pub fn promote(&self) {
        let mut promote = as_postgres("pg_ctl");
        promote.args(["-w", "-D"]).arg(self.data()).arg("promote");
        run(promote, "pg_ctl promote");
    }

    /// Cuts this standby off its primary (no more WAL arrives; what it has is replayed):
    /// transactions committed on the primary from now on are lost at a promotion.
    pub fn stop_streaming(&self) {
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.auto.conf"))
            .unwrap();
        use std::io::Write as _;
        writeln!(conf, "primary_conninfo = ''").unwrap();
        let mut reload = as_postgres("pg_ctl");
        reload.args(["-D"]).arg(self.data()).arg("reload");
        run(reload, "pg_ctl reload");
    }
}

/// A TCP proxy on a free loopback port forwarding every connection to `127.0.0.1:<target>`.
/// [`Proxy::switch`] points it elsewhere and closes the connections to the old target.
pub struct Proxy {
    pub port: u16,
    target: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (target, conns) = (target.clone(), conns.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let to = target.load(Ordering::SeqCst);
                    let task = tokio::spawn(async move {
                        // A refused connect closes the client's: what a dead backend looks like.
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut conns = conns.lock().unwrap();
                    conns.retain(|t| !t.is_finished());
                    conns.push(task);
                }
            }
        });
        Proxy {
            port,
            target,
            conns,
            accept,
        }
    }

    /// Forwards new connections to `target` and drops every open one.
    pub fn switch(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// `postgres://…@127.0.0.1:<proxy port>/db` for `url` (any host and port replaced).
    pub fn url(&self, url: &str) -> String {
        let (head, rest) = url.rsplit_once('@').expect("URL has user@host");
        let (_, path) = rest.split_once('/').expect("URL has a database");
        format!("{head}@127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.switch(0);
    }
}
