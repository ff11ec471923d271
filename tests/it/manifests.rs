//! deploy/: the Kubernetes manifests, the systemd unit, the nats-server configs and
//! docker-compose.yaml agree with the service they run (no cluster, no container engine).
//!
//! - every YAML file parses (multi-document);
//! - every environment variable given to nats-pg-auth is one it reads (`[env: …]` in the
//!   binary's own `--help` of the verb it runs, plus RUST_LOG);
//! - `serve` containers probe /healthz (liveness) and /readyz (readiness) on the port of
//!   NATS_PG_AUTH_HTTP_LISTEN; compose's serve health check is /readyz on that port;
//! - every container requests resources; every Secret key and ConfigMap used exists (the
//!   fragment ConfigMap is the one the init Job writes); the PodDisruptionBudget selects the
//!   StatefulSet's pods; the nats.conf embedded in the ConfigMaps is deploy/nats/*.conf verbatim;
//!   nats images match compose's pin;
//! - the systemd unit passes `systemd-analyze verify` (when systemd-analyze exists), its
//!   Environment= names are read by the service, and the key comes from LoadCredential=.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

use crate::compose::{environment, load_yaml};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nats-pg-auth")
}

/// Environment variables `nats-pg-auth <verb>` reads, from its own --help.
fn env_names(verb: &str) -> BTreeSet<String> {
    let out = Command::new(bin()).args([verb, "--help"]).output().unwrap();
    assert!(out.status.success(), "{verb} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(
        names.contains("DATABASE_URL"),
        "{verb} --help lists env vars"
    );
    names.insert("RUST_LOG".into());
    names
}

fn verb_of(args: &[String]) -> String {
    args.first().cloned().unwrap_or_else(|| "serve".into())
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn k8s_docs() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "deploy/kubernetes has the manifests");
    let mut docs = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", f.display()));
            if v.is_null() {
                continue;
            }
            assert!(
                v["apiVersion"].is_string() && v["kind"].is_string(),
                "{}: a document without apiVersion/kind",
                f.display()
            );
            docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    docs
}

use serde::Deserialize;

fn named<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn port_of_listen(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn kubernetes_manifests_match_what_the_service_reads() {
    let docs = k8s_docs();
    let compose = load_yaml(&repo().join("docker-compose.yaml"));
    let nats_image = compose["services"]["nats"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let job_text = fs::read_to_string(repo().join("deploy/kubernetes/init-job.yaml")).unwrap();

    let mut serve_containers = 0;
    let mut saw_verbs = BTreeSet::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap();
        let spec = match kind {
            "Deployment" | "StatefulSet" | "Job" => &doc["spec"]["template"]["spec"],
            _ => continue,
        };
        let volumes: BTreeMap<String, Value> = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
            .collect();
        let claim_templates: BTreeSet<String> = doc["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .map(|s| {
                s.iter()
                    .map(|t| t["metadata"]["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        // Volumes refer to Secrets/ConfigMaps/claims that exist.
        for (vname, v) in &volumes {
            if let Some(s) = v.get("secret") {
                let secret = named(&docs, "Secret", s["secretName"].as_str().unwrap())
                    .unwrap_or_else(|| panic!("{file}: volume {vname}: no such Secret"));
                for item in s["items"].as_sequence().into_iter().flatten() {
                    let key = item["key"].as_str().unwrap();
                    assert!(
                        secret["stringData"].get(key).is_some(),
                        "{file}: volume {vname}: Secret has no key {key}"
                    );
                }
            }
            if let Some(c) = v.get("configMap") {
                let name = c["name"].as_str().unwrap();
                if name == "nats-pg-auth-fragment" {
                    assert!(
                        job_text.contains("create configmap nats-pg-auth-fragment"),
                        "the init Job writes the fragment ConfigMap"
                    );
                } else {
                    assert!(
                        named(&docs, "ConfigMap", name).is_some(),
                        "{file}: no ConfigMap {name}"
                    );
                }
            }
            if let Some(c) = v.get("persistentVolumeClaim") {
                let name = c["claimName"].as_str().unwrap();
                assert!(
                    named(&docs, "PersistentVolumeClaim", name).is_some(),
                    "{file}: no PVC {name}"
                );
            }
        }
        let containers = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .chain(spec["initContainers"].as_sequence().into_iter().flatten());
        for c in containers {
            let cname = c["name"].as_str().unwrap();
            let image = c["image"].as_str().unwrap();
            let requests = &c["resources"]["requests"];
            assert!(
                requests["cpu"].is_string() && requests["memory"].is_string(),
                "{file}: container {cname} requests cpu and memory"
            );
            for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                let v = m["name"].as_str().unwrap();
                assert!(
                    volumes.contains_key(v) || claim_templates.contains(v),
                    "{file}: {cname} mounts unknown volume {v}"
                );
            }
            let mut env = BTreeMap::new();
            // Downward-API variables ($(POD_IP)) exist only to be expanded into others.
            let mut downward: BTreeMap<String, String> = BTreeMap::new();
            for e in c["env"].as_sequence().into_iter().flatten() {
                let name = e["name"].as_str().unwrap().to_owned();
                if let Some(f) = e.get("valueFrom").and_then(|v| v.get("fieldRef")) {
                    downward.insert(name, f["fieldPath"].as_str().unwrap().to_owned());
                    continue;
                }
                if let Some(r) = e.get("valueFrom").and_then(|v| v.get("secretKeyRef")) {
                    let secret = named(&docs, "Secret", r["name"].as_str().unwrap())
                        .unwrap_or_else(|| panic!("{file}: {cname}: no Secret {:?}", r["name"]));
                    let key = r["key"].as_str().unwrap();
                    assert!(
                        secret["stringData"].get(key).is_some(),
                        "{file}: {cname}: Secret has no key {key}"
                    );
                }
                env.insert(
                    name,
                    e.get("value")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                );
            }
            if image.starts_with("nats:") {
                assert_eq!(
                    image, nats_image,
                    "{file}: nats image pinned as in docker-compose.yaml"
                );
                continue;
            }
            if !image.starts_with("nats-pg-auth") {
                continue;
            }
            let args = str_list(&c["args"]);
            let verb = verb_of(&args);
            saw_verbs.insert(verb.clone());
            let known = env_names(&verb);
            for name in env.keys() {
                assert!(
                    known.contains(name),
                    "{file}: {cname} sets {name}, which `nats-pg-auth {verb}` does not read"
                );
            }
            if let Some(path) = env.get("NATS_PG_AUTH_ENCRYPTION_KEY_FILE") {
                let dir = std::path::Path::new(path)
                    .parent()
                    .unwrap()
                    .to_str()
                    .unwrap();
                let file_name = std::path::Path::new(path)
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap();
                let mount = c["volumeMounts"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|m| m["mountPath"].as_str() == Some(dir))
                    .unwrap_or_else(|| panic!("{file}: {cname}: nothing mounted at {dir}"));
                let vol = &volumes[mount["name"].as_str().unwrap()];
                let items = vol["secret"]["items"]
                    .as_sequence()
                    .expect("key from a Secret");
                assert!(items.iter().any(|i| i["path"].as_str() == Some(file_name)));
            }
            if verb == "serve" {
                serve_containers += 1;
                let listen = env
                    .get("NATS_PG_AUTH_HTTP_LISTEN")
                    .unwrap_or_else(|| panic!("{file}: {cname}: set NATS_PG_AUTH_HTTP_LISTEN (the default is loopback only)"));
                // The kubelet probes the pod IP; binding every interface would also expose
                // the endpoints on any other address the pod has (issue 15).
                assert!(
                    listen.starts_with("$(POD_IP):")
                        && downward.get("POD_IP").map(String::as_str) == Some("status.podIP"),
                    "{file}: {cname}: NATS_PG_AUTH_HTTP_LISTEN must be $(POD_IP):PORT with POD_IP from status.podIP, not {listen}"
                );
                let policy = docs
                    .iter()
                    .find(|(_, d)| d["kind"].as_str() == Some("NetworkPolicy"))
                    .map(|(_, d)| d)
                    .expect("deploy/kubernetes has a NetworkPolicy for the NATS pods");
                let labels = &doc["spec"]["template"]["metadata"]["labels"];
                for (k, v) in policy["spec"]["podSelector"]["matchLabels"]
                    .as_mapping()
                    .unwrap()
                {
                    assert_eq!(
                        &labels[k], v,
                        "{file}: the NetworkPolicy selects these pods"
                    );
                }
                let metrics_port = port_of_listen(listen);
                let rules: Vec<&Value> = policy["spec"]["ingress"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter(|r| {
                        r["ports"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .any(|p| p["port"].as_u64() == Some(metrics_port))
                    })
                    .collect();
                assert!(
                    !rules.is_empty(),
                    "the NetworkPolicy admits the metrics port"
                );
                for r in rules {
                    let from = r["from"].as_sequence().expect("metrics port: `from` given");
                    assert!(
                        !from.is_empty()
                            && from.iter().all(|f| f.get("namespaceSelector").is_some()),
                        "the metrics port is admitted from the monitoring namespace only: {r:?}"
                    );
                }
                let port = port_of_listen(listen);
                let resolve = |p: &Value| -> u64 {
                    match p {
                        Value::Number(n) => n.as_u64().unwrap(),
                        Value::String(s) => c["ports"]
                            .as_sequence()
                            .unwrap()
                            .iter()
                            .find(|cp| cp["name"].as_str() == Some(s))
                            .unwrap_or_else(|| panic!("{file}: no container port named {s}"))
                            ["containerPort"]
                            .as_u64()
                            .unwrap(),
                        other => panic!("probe port {other:?}"),
                    }
                };
                for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
                {
                    let get = &c[probe]["httpGet"];
                    assert_eq!(get["path"].as_str(), Some(path), "{file}: {cname} {probe}");
                    assert_eq!(
                        resolve(&get["port"]),
                        port,
                        "{file}: {cname} {probe} port = --http-listen port"
                    );
                }
            }
        }
    }
    assert!(
        serve_containers >= 2,
        "sidecar and StatefulSet both run serve"
    );
    assert!(saw_verbs.contains("migrate") && saw_verbs.contains("init"));

    // The nats.conf in the ConfigMaps is deploy/nats/*.conf verbatim.
    for (cm, file) in [
        ("nats-config", "nats.conf"),
        ("nats-cluster-config", "cluster.conf"),
    ] {
        let embedded = named(&docs, "ConfigMap", cm).unwrap()["data"]["nats.conf"]
            .as_str()
            .unwrap()
            .to_owned();
        let source = fs::read_to_string(repo().join("deploy/nats").join(file)).unwrap();
        assert_eq!(
            embedded, source,
            "ConfigMap {cm} differs from deploy/nats/{file}"
        );
        assert!(source.contains("include \"pg-auth/nats-pg-auth.conf\""));
    }

    // StatefulSet: three replicas, a PDB selecting its pods.
    let sts = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .expect("a StatefulSet");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(3));
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    let pdb = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some("PodDisruptionBudget"))
        .expect("a PodDisruptionBudget");
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "PDB selects the StatefulSet's pods"
        );
    }
}

#[test]
fn compose_environment_is_read_by_the_service() {
    let compose = load_yaml(&repo().join("docker-compose.yaml"));
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        if svc.get("build").is_none() || svc.get("entrypoint").is_some() {
            continue;
        }
        let verb = verb_of(&str_list(&svc["command"]));
        let known = env_names(&verb);
        let env = environment(svc);
        for k in env.keys() {
            assert!(
                known.contains(k),
                "compose {name:?} sets {k}, which `{verb}` does not read"
            );
        }
        if verb == "serve" {
            let port = port_of_listen(&env["NATS_PG_AUTH_HTTP_LISTEN"]);
            let test = str_list(&svc["healthcheck"]["test"]).join(" ");
            assert!(
                test.contains(&format!("127.0.0.1:{port}/readyz")),
                "compose serve health check is /readyz on the --http-listen port: {test}"
            );
        }
    }
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let path = repo().join("deploy/systemd/nats-pg-auth.service");
    let unit = fs::read_to_string(&path).unwrap();
    let known = env_names("serve");
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in unit.lines() {
        let l = l.trim();
        if l.starts_with('#') || l.starts_with('[') || l.is_empty() {
            continue;
        }
        let (k, v) = l.split_once('=').unwrap();
        settings.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    let one = |k: &str| {
        settings
            .get(k)
            .and_then(|v| v.last())
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(one("ExecStart"), "/usr/local/bin/nats-pg-auth serve");
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let mut env = BTreeMap::new();
    for e in settings.get("Environment").into_iter().flatten() {
        let (k, v) = e.split_once('=').unwrap();
        assert!(
            known.contains(k),
            "the unit sets {k}, which serve does not read"
        );
        env.insert(k.to_owned(), v.to_owned());
    }
    let key_file = &env["NATS_PG_AUTH_ENCRYPTION_KEY_FILE"];
    let cred = key_file
        .strip_prefix("%d/")
        .expect("key file in the credentials directory");
    assert!(
        one("LoadCredential").starts_with(&format!("{cred}:")),
        "LoadCredential= provides {cred}"
    );

    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit NOT verified");
        return;
    };
    assert!(out.status.success());
    // Verify a copy whose ExecStart is the binary just built (verify wants it to exist).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("nats-pg-auth.service");
    fs::write(&copy, unit.replace("/usr/local/bin/nats-pg-auth", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nats-pg-auth"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// Issue 17: every deployment keeps the login copy's sealed snapshot where a replica restarted
/// during a Postgres outage finds it: in JetStream (the servers beside it run JetStream), and
/// `--snapshot-dir`, when set, on a writable volume of the container (the root filesystem is
/// read-only) that no two replicas share.
#[test]
fn every_deployment_keeps_the_snapshot_where_a_restarted_replica_finds_it() {
    let docs = k8s_docs();
    let mut checked = 0;
    for (file, doc) in &docs {
        let spec = &doc["spec"]["template"]["spec"];
        let Some(containers) = spec["containers"].as_sequence() else {
            continue;
        };
        let env_of = |c: &Value| -> BTreeMap<String, String> {
            c["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e.get("value")?.as_str()?.to_owned(),
                    ))
                })
                .collect()
        };
        for c in containers {
            if str_list(&c["args"]).first().map(String::as_str) != Some("serve") {
                continue;
            }
            checked += 1;
            let cname = c["name"].as_str().unwrap();
            let env = env_of(c);
            assert_eq!(
                env.get("NATS_PG_AUTH_SNAPSHOT_JETSTREAM")
                    .map(String::as_str),
                Some("true"),
                "{file}: {cname} keeps the snapshot in JetStream"
            );
            // The pod's nats-server runs JetStream (its config map has a jetstream block).
            let config = spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"].as_str() == Some("nats-config"))
                .and_then(|v| v["configMap"]["name"].as_str())
                .and_then(|name| named(&docs, "ConfigMap", name))
                .unwrap_or_else(|| panic!("{file}: the nats-server config map"));
            let conf: String = config["data"]
                .as_mapping()
                .unwrap()
                .values()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                conf.contains("jetstream {"),
                "{file}: nats-server runs JetStream"
            );
            let replicas = doc["spec"]["replicas"].as_u64().unwrap_or(1);
            if let Some(r) = env.get("NATS_PG_AUTH_SNAPSHOT_REPLICAS") {
                let r: u64 = r.parse().unwrap();
                assert!(
                    (1..=replicas.min(5)).contains(&r),
                    "{file}: {r} bucket replicas with {replicas} servers"
                );
            }
            if let Some(dir) = env.get("NATS_PG_AUTH_SNAPSHOT_DIR") {
                let mount = c["volumeMounts"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|m| m["mountPath"].as_str() == Some(dir.as_str()))
                    .unwrap_or_else(|| panic!("{file}: {cname}: nothing mounted at {dir}"));
                assert_ne!(
                    mount["readOnly"].as_bool(),
                    Some(true),
                    "{file}: {cname}: {dir} is writable"
                );
                let volume = spec["volumes"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{file}: volume {:?}", mount["name"]));
                assert!(
                    volume.get("emptyDir").is_some(),
                    "{file}: {cname}: the snapshot directory is the pod's own (emptyDir), not shared"
                );
            }
        }
    }
    assert!(checked >= 2, "both Kubernetes examples run serve");

    let compose = load_yaml(&repo().join("docker-compose.yaml"));
    let serve = &compose["services"]["serve"];
    let env = environment(serve);
    assert_eq!(
        env.get("NATS_PG_AUTH_SNAPSHOT_JETSTREAM")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        !env.contains_key("NATS_PG_AUTH_SNAPSHOT_DIR"),
        "compose's replicas share no directory"
    );
    let nats_conf = fs::read_to_string(repo().join("deploy/nats/nats.conf")).unwrap();
    assert!(nats_conf.contains("jetstream {"));

    let unit = fs::read_to_string(repo().join("deploy/systemd/nats-pg-auth.service")).unwrap();
    assert!(unit.contains("\nStateDirectory=nats-pg-auth\n"));
    assert!(unit.contains("\nEnvironment=NATS_PG_AUTH_SNAPSHOT_DIR=%S/nats-pg-auth\n"));
}
