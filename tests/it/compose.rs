//! docker-compose.yaml, run without a container engine: every service's command, entrypoint and
//! environment exactly as the file says, as plain processes on loopback, in the file's
//! `depends_on` order, then a login as the demo user through them.
//!
//! What is mapped, and nothing else:
//! - service hostnames (`postgres:5432`, `nats:4222`) and a service's own `0.0.0.0:P` /
//!   `127.0.0.1:P` to `127.0.0.1:<free port>`, per replica, for the ports a service `expose`s;
//! - container paths that are mount targets to the same path under a temporary root (named
//!   volumes are shared directories, bind-mounted files are copied there with the same mapping);
//! - images to binaries: `build: .` runs the Dockerfile's ENTRYPOINT/CMD/ENV with our
//!   `nats-pg-auth` first on PATH, `nats:<version>` runs NATS_SERVER_BIN (the versions must match),
//!   an entrypoint of the `postgres` image (`psql`) runs the local client;
//! - the `postgres` service is the suite's throwaway cluster: its POSTGRES_USER is created as the
//!   image would, its POSTGRES_DB becomes a fresh uniquely named database.
//!   (Roles are cluster-wide: the compose user and the `nats_pg_auth` login role of
//!   deploy/compose/demo.sql stay in that throwaway cluster, with the file's demo passwords.)
//!
//! One-shot services (someone waits for `service_completed_successfully`) must exit 0; the others
//! must pass their healthcheck (its URL, mapped, must answer 200) before dependants start.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;

use crate::common::{admin_url, free_port, nats_server_bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn load_yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        None | Some(Value::Null) => vec![],
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("expected a string, got {other:?}"),
            })
            .collect(),
        // Compose splits a string command shell-like; keep this file to lists.
        Some(other) => panic!("use the list form for commands and ports: {other:?}"),
    }
}

pub fn environment(svc: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match svc.get("environment") {
        None => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                env.insert(k.as_str().unwrap().to_owned(), v);
            }
        }
        Some(Value::Sequence(s)) => {
            for e in s {
                let (k, v) = e.as_str().unwrap().split_once('=').expect("KEY=value");
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        Some(other) => panic!("environment {other:?}"),
    }
    env
}

/// ENTRYPOINT, CMD and ENV of the runtime (last) stage of the Dockerfile.
struct Dockerfile {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
    user: Option<String>,
}

fn dockerfile() -> Dockerfile {
    let text = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            lines.push(std::mem::take(&mut cur));
        }
    }
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let mut d = Dockerfile {
        entrypoint: vec![],
        cmd: vec![],
        env: BTreeMap::new(),
        user: None,
    };
    for l in &lines[last_from..] {
        let (instr, rest) = l.split_once(' ').unwrap_or((l, ""));
        match instr {
            "ENTRYPOINT" => d.entrypoint = serde_json::from_str(rest).expect("exec form"),
            "CMD" => d.cmd = serde_json::from_str(rest).expect("exec form"),
            "USER" => d.user = Some(rest.trim().to_owned()),
            "ENV" => {
                for kv in rest.split_whitespace() {
                    let (k, v) = kv.split_once('=').expect("ENV K=V");
                    d.env.insert(k.to_owned(), v.to_owned());
                }
            }
            _ => {}
        }
    }
    d
}

/// Services in start order (dependencies first, otherwise file order).
fn start_order(services: &serde_yaml::Mapping) -> Vec<String> {
    let names: Vec<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let deps = |n: &str| -> Vec<String> {
        match services[n].get("depends_on") {
            None => vec![],
            Some(Value::Mapping(m)) => m.keys().map(|k| k.as_str().unwrap().to_owned()).collect(),
            Some(v) => strings(Some(v)),
        }
    };
    let mut order: Vec<String> = Vec::new();
    while order.len() < names.len() {
        let next = names
            .iter()
            .find(|n| !order.contains(n) && deps(n).iter().all(|d| order.contains(d)))
            .unwrap_or_else(|| panic!("depends_on has a cycle or names a missing service"));
        order.push(next.clone());
    }
    order
}

/// Rewrites one string as seen from inside `svc` (replica `r`).
struct Mapper {
    root: PathBuf,
    /// (service, replica) -> container port -> host port
    ports: HashMap<(String, usize), HashMap<u16, u16>>,
    /// mount targets, longest first
    targets: Vec<String>,
    /// (from, to) applied last: the compose database name to the test's own
    db_rename: (String, String),
}

impl Mapper {
    fn map(&self, svc: &str, replica: usize, s: &str) -> String {
        let mut out = s.to_owned();
        for ((other, r), ports) in &self.ports {
            for (cport, hport) in ports {
                if other == svc && *r == replica {
                    for host in ["0.0.0.0", "127.0.0.1", "localhost"] {
                        out =
                            out.replace(&format!("{host}:{cport}"), &format!("127.0.0.1:{hport}"));
                    }
                }
                if *r == 0 {
                    out = out.replace(&format!("{other}:{cport}"), &format!("127.0.0.1:{hport}"));
                }
            }
        }
        out = self.map_paths(&out);
        out.replace(&self.db_rename.0, &self.db_rename.1)
    }

    /// Mount targets at a path boundary, one pass, longest first.
    fn map_paths(&self, s: &str) -> String {
        let root = self.root.display().to_string();
        let mut out = String::new();
        let b = s.as_bytes();
        let mut i = 0;
        'scan: while i < s.len() {
            let boundary =
                i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b"/._-".contains(&b[i - 1]));
            if boundary && b[i] == b'/' {
                for t in &self.targets {
                    if s[i..].starts_with(t.as_str()) {
                        let end = i + t.len();
                        if end == s.len()
                            || !(b[end].is_ascii_alphanumeric() || b"._-".contains(&b[end]))
                        {
                            out.push_str(&root);
                            out.push_str(t);
                            i = end;
                            continue 'scan;
                        }
                    }
                }
            }
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
        out
    }
}

struct Procs {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Procs {
    fn tails(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = fs::read_dir(&self.logs) {
            let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                let text = fs::read_to_string(&f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                out.push_str(&format!("\n--- {} ---\n", f.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn http_status(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(hostport).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    Some(resp.lines().next().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_services_run_as_processes_and_the_demo_user_logs_in() {
    let compose = load_yaml(&repo().join("docker-compose.yaml"));
    let services = compose["services"].as_mapping().expect("services").clone();
    let order = start_order(&services);
    let docker = dockerfile();
    assert_eq!(docker.entrypoint, ["nats-pg-auth"], "Dockerfile ENTRYPOINT");
    assert!(
        docker
            .user
            .as_deref()
            .is_some_and(|u| !u.starts_with("0") && u != "root"),
        "the image runs as a non-root user"
    );
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nats-pg-auth"));
    let bin_dir = bin.parent().unwrap().to_path_buf();

    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().to_path_buf();
    let logs = root.join("logs");
    fs::create_dir_all(&logs).unwrap();
    let mut procs = Procs {
        children: vec![],
        logs: logs.clone(),
    };

    // One-shot services: the ones others wait on to complete.
    let mut one_shot = std::collections::HashSet::new();
    for (_, svc) in &services {
        if let Some(Value::Mapping(m)) = svc.get("depends_on") {
            for (d, c) in m {
                if c["condition"].as_str() == Some("service_completed_successfully") {
                    one_shot.insert(d.as_str().unwrap().to_owned());
                }
            }
        }
    }

    // Postgres: the suite's cluster, with the compose's user and a fresh database for its DB.
    let pg = &services["postgres"];
    let pg_env = environment(pg);
    let pg_user = &pg_env["POSTGRES_USER"];
    let pg_pass = &pg_env["POSTGRES_PASSWORD"];
    let pg_db = &pg_env["POSTGRES_DB"];
    let test_db = format!("compose_{}", uuid::Uuid::new_v4().simple());
    let admin = admin_url();
    let admin_pool = sqlx::PgPool::connect(&admin).await.expect("admin connect");
    sqlx::query(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{pg_user}') THEN \
         CREATE ROLE \"{pg_user}\" LOGIN SUPERUSER PASSWORD '{pg_pass}'; END IF; END $$"
    ))
    .execute(&admin_pool)
    .await
    .unwrap();
    sqlx::query(&format!("CREATE DATABASE {test_db} OWNER \"{pg_user}\""))
        .execute(&admin_pool)
        .await
        .unwrap();
    let pg_port: u16 = admin
        .rsplit_once(':')
        .and_then(|(_, r)| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("admin URL has a port");

    // Ports: each replica of each service gets free host ports for what it exposes.
    let mut replicas = HashMap::new();
    let mut ports = HashMap::new();
    let mut targets: BTreeMap<String, String> = BTreeMap::new(); // target -> source
    for name in &order {
        let svc = &services[name.as_str()];
        let n = svc
            .get("deploy")
            .and_then(|d| d.get("replicas"))
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        replicas.insert(name.clone(), n);
        let mut exposed: Vec<u16> = strings(svc.get("expose"))
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        for p in strings(svc.get("ports")) {
            let c = p.rsplit(':').next().unwrap().split('/').next().unwrap();
            exposed.push(c.parse().unwrap());
        }
        for r in 0..n {
            let map: HashMap<u16, u16> = exposed
                .iter()
                .map(|&p| {
                    (
                        p,
                        if name == "postgres" {
                            pg_port
                        } else {
                            free_port()
                        },
                    )
                })
                .collect();
            ports.insert((name.clone(), r), map);
        }
        for v in strings(svc.get("volumes")) {
            let parts: Vec<&str> = v.split(':').collect();
            let (src, tgt) = (parts[0].to_owned(), parts[1].to_owned());
            if let Some(prev) = targets.insert(tgt.clone(), src.clone()) {
                assert_eq!(
                    prev, src,
                    "two sources mounted at {tgt}: the mapping needs one"
                );
            }
        }
    }
    let mut target_list: Vec<String> = targets.keys().cloned().collect();
    target_list.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let mapper = Mapper {
        root: root.clone(),
        ports,
        targets: target_list,
        db_rename: (
            format!(":{pg_port}/{pg_db}"),
            format!(":{pg_port}/{test_db}"),
        ),
    };

    // Volumes: named ones are shared directories, linked at each target; bind mounts are copied
    // (text, mapped as seen from the service mounting them).
    for name in &order {
        let svc = &services[name.as_str()];
        for v in strings(svc.get("volumes")) {
            let parts: Vec<&str> = v.split(':').collect();
            let (src, tgt) = (parts[0], parts[1]);
            let at = root.join(tgt.trim_start_matches('/'));
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            if at.exists() || at.is_symlink() {
                continue;
            }
            if src.starts_with("./") || src.starts_with('/') {
                let host = repo().join(src);
                let text = fs::read_to_string(&host).unwrap();
                fs::write(&at, mapper.map(name, 0, &text)).unwrap();
            } else {
                let dir = root.join("volumes").join(src);
                fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::symlink(&dir, &at).unwrap();
            }
        }
    }

    let nats_bin = nats_server_bin();
    let path_env = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let deadline = Duration::from_secs(90);

    for name in &order {
        if name == "postgres" {
            continue;
        }
        let svc = &services[name.as_str()];
        let image = svc.get("image").and_then(Value::as_str).unwrap_or("");
        let entrypoint = strings(svc.get("entrypoint"));
        let command = strings(svc.get("command"));
        for r in 0..replicas[name] {
            let mut env = BTreeMap::new();
            let argv: Vec<String> = if svc.get("build").is_some() {
                env.extend(docker.env.clone());
                let ep = if entrypoint.is_empty() {
                    docker.entrypoint.clone()
                } else {
                    entrypoint.clone()
                };
                let cmd = if command.is_empty() && entrypoint.is_empty() {
                    docker.cmd.clone()
                } else {
                    command.clone()
                };
                ep.into_iter().chain(cmd).collect()
            } else if let Some(tag) = image.strip_prefix("nats:") {
                let version = tag.split('-').next().unwrap();
                let out = Command::new(&nats_bin).arg("--version").output().unwrap();
                let have = String::from_utf8_lossy(&out.stdout);
                assert!(
                    have.contains(&format!("v{version}")),
                    "compose pins nats:{tag}, the test's nats-server is {have}: keep them equal (scripts/setup.sh NATS_SERVER_VERSION)"
                );
                assert!(entrypoint.is_empty(), "nats: use the image's entrypoint");
                std::iter::once(nats_bin.clone())
                    .chain(command.clone())
                    .collect()
            } else if image.starts_with("postgres:") {
                assert!(
                    !entrypoint.is_empty(),
                    "{name}: a postgres-image job needs an entrypoint (psql)"
                );
                entrypoint.iter().chain(&command).cloned().collect()
            } else {
                panic!("{name}: no local stand-in for image {image:?}");
            };
            env.extend(environment(svc));
            let argv: Vec<String> = argv.iter().map(|a| mapper.map(name, r, a)).collect();
            let env: BTreeMap<String, String> = env
                .into_iter()
                .map(|(k, v)| (k, mapper.map(name, r, &v)))
                .collect();
            let log = logs.join(format!("{:02}-{name}-{r}.log", procs.children.len()));
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .env_clear()
                .env("PATH", &path_env)
                .envs(&env)
                .current_dir(&root)
                .stdin(Stdio::null());
            let out = fs::File::create(&log).unwrap();
            cmd.stdout(out.try_clone().unwrap()).stderr(out);
            eprintln!("compose-as-processes: {name}[{r}]: {argv:?}");
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("{name}: cannot start {argv:?}: {e}"));
            if one_shot.contains(name) {
                let status = child.wait().unwrap();
                assert!(
                    status.success(),
                    "{name} (one-shot) exited {status}{}",
                    procs.tails()
                );
                continue;
            }
            procs.children.push((format!("{name}[{r}]"), child));
            // Healthcheck: its URL, mapped, must answer 200.
            if let Some(test) = svc.get("healthcheck").map(|h| strings(h.get("test"))) {
                let url = test
                    .iter()
                    .find(|a| a.starts_with("http://"))
                    .unwrap_or_else(|| panic!("{name}: healthcheck without an http:// URL"));
                let url = mapper.map(name, r, url);
                let start = Instant::now();
                loop {
                    let status = http_status(&url);
                    if status.as_deref().is_some_and(|s| s.contains(" 200 ")) {
                        break;
                    }
                    let exited = procs.children.iter_mut().find_map(|(n, c)| {
                        c.try_wait()
                            .ok()
                            .flatten()
                            .map(|st| format!("{n} exited {st}"))
                    });
                    if let Some(why) = exited {
                        panic!("{why} before {name} was healthy{}", procs.tails());
                    }
                    assert!(
                        start.elapsed() < deadline,
                        "{name}[{r}] not healthy at {url}: {status:?}{}",
                        procs.tails()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                eprintln!("compose-as-processes: {name}[{r}] healthy ({url})");
            }
        }
    }

    // deploy/nats/cluster.conf (the StatefulSet's) with the same fragment: nats-server accepts it.
    let cluster_conf = root.join("etc/nats/cluster.conf");
    let text = fs::read_to_string(repo().join("deploy/nats/cluster.conf")).unwrap();
    fs::write(&cluster_conf, mapper.map_paths(&text)).unwrap();
    let out = Command::new(&nats_bin)
        .arg("-t")
        .arg("-c")
        .arg(&cluster_conf)
        .env("POD_NAME", "nats-0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nats-server -t cluster.conf: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The demo user, as the compose file's header tells a newcomer.
    let header = fs::read_to_string(repo().join("docker-compose.yaml")).unwrap();
    assert!(header.contains("nats://alice:s3cret@127.0.0.1:4222"));
    let nats_port = mapper.ports[&("nats".to_owned(), 0)][&4222];
    let url = format!("nats://127.0.0.1:{nats_port}");
    let start = Instant::now();
    let alice = loop {
        match async_nats::ConnectOptions::with_user_and_password("alice".into(), "s3cret".into())
            .connect(&url)
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < deadline,
                    "alice cannot log in: {e}{}",
                    procs.tails()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let token = async_nats::ConnectOptions::with_token("demo-token".into())
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("demo-token cannot log in: {e}{}", procs.tails()));
    use futures::StreamExt;
    let mut sub = token.subscribe("sensors.>").await.unwrap();
    // `flush` only drains the client's socket: the server may still see alice's PUB before the
    // SUB (and the demo role may not publish to its own inbox, so `common::settle` cannot be
    // used). Publish again until the subscriber has it.
    let msg = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            alice.publish("sensors.t1", "21.5".into()).await.unwrap();
            alice.flush().await.unwrap();
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                break m;
            }
        }
    })
    .await
    .expect("message within 5s")
    .unwrap();
    assert_eq!(&msg.payload[..], b"21.5");
    drop(alice);
    drop(token);
    drop(procs);
    sqlx::query(&format!("DROP DATABASE IF EXISTS {test_db} WITH (FORCE)"))
        .execute(&admin_pool)
        .await
        .ok();
}
