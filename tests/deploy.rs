//! `deploy/` (the Kubernetes sidecar with the Redis backend) is checked
//! against the real product: every manifest parses and is listed by the
//! kustomization, the sidecar's args are a `run` command line the binary
//! accepts, the ConfigMap's config passes `idemproxy check`, the probes hit
//! admin paths that answer on a live proxy, and every port and name that
//! links two objects agrees. `scripts/image-check` runs these too.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use idemproxy::cli::{Cli, Command};
use idemproxy::config::{Config, StoreConfig};
use serde::Deserialize;
use serde_json::Value;
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of a YAML file, as JSON values.
fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v = serde_yaml_ng::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects the kustomization applies (every one checked for the basics).
fn objects() -> Vec<Value> {
    let dir = repo().join("deploy");
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml has resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml's resources and deploy/*.yaml differ"
    );
    let mut out = Vec::new();
    for file in &listed {
        for doc in documents(&dir.join(file)) {
            for field in ["apiVersion", "kind"] {
                assert!(doc[field].is_string(), "{file}: a document without {field}");
            }
            assert!(
                doc["metadata"]["name"].is_string(),
                "{file}: a {} without metadata.name",
                doc["kind"]
            );
            out.push(doc);
        }
    }
    out
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/"))
}

/// The Deployment whose pod runs the idemproxy sidecar, and that container.
fn sidecar(objects: &[Value]) -> (&Value, &Value) {
    for o in objects.iter().filter(|o| o["kind"] == "Deployment") {
        if let Some(c) = containers(o).iter().find(|c| c["name"] == "idemproxy") {
            return (o, c);
        }
    }
    panic!("no Deployment has a container named idemproxy");
}

fn containers(deployment: &Value) -> &Vec<Value> {
    deployment["spec"]["template"]["spec"]["containers"].as_array().unwrap()
}

/// Whether `service` sends traffic to the pods of `deployment`.
fn selects(service: &Value, deployment: &Value) -> bool {
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    deployment["kind"] == "Deployment"
        && service["spec"]["selector"]
            .as_object()
            .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
}

/// A container port by name or number, searched in every container of the pod.
fn pod_port(deployment: &Value, port: &Value) -> Option<(String, u16)> {
    containers(deployment).iter().find_map(|c| {
        c["ports"].as_array()?.iter().find_map(|p| {
            let hit = if port.is_string() {
                p["name"] == *port
            } else {
                p["containerPort"] == *port
            };
            hit.then(|| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    p["containerPort"].as_u64().unwrap() as u16,
                )
            })
        })
    })
}

/// The rest of the Dockerfile's last line starting with `prefix`
/// (`"USER "`, `"CMD "`, `"ENV IDEMPROXY_CONFIG="`).
fn dockerfile(prefix: &str) -> String {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .next_back()
        .unwrap_or_else(|| panic!("the Dockerfile has no line {prefix}..."))
        .trim()
        .to_owned()
}

/// The sidecar's command line (its `args`, else the image's CMD) and the
/// config it resolves to: the ConfigMap's file, written where the pod
/// mounts it (relative to a temp dir), loaded exactly as `run` would.
struct Sidecar {
    args: Vec<String>,
    file: PathBuf,
    config: Config,
    _dir: tempfile::TempDir,
}

fn sidecar_config(objects: &[Value]) -> Sidecar {
    let (deployment, container) = sidecar(objects);
    let args: Vec<String> = match container["args"].as_array() {
        Some(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        None => serde_json::from_str(&dockerfile("CMD ")).expect("CMD in JSON form"),
    };
    assert!(
        container["command"].is_null(),
        "the sidecar overrides the image's entrypoint"
    );
    let cli = Cli::try_parse_from(std::iter::once("idemproxy".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the sidecar's args {args:?} are not an idemproxy command line: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("the sidecar's args {args:?} are not `run ...`");
    };
    let path = run
        .config
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(dockerfile("ENV IDEMPROXY_CONFIG=")));

    // The volume mounted over the config's directory, and the ConfigMap key.
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == path.parent().unwrap())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.parent().unwrap().display()));
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume named {}", mount["name"]));
    let map = find(
        objects,
        "ConfigMap",
        volume["configMap"]["name"].as_str().expect("a configMap volume"),
    );
    let key = path.file_name().unwrap().to_str().unwrap();
    let text = map["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {} has no key {key}", map["metadata"]["name"]));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(path.strip_prefix("/").unwrap());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, text).unwrap();
    let config = Config::load(&file, true, &run.overrides())
        .unwrap_or_else(|e| panic!("the sidecar's config does not load with its args: {e}"));
    Sidecar {
        args,
        file,
        config,
        _dir: dir,
    }
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_them_all() {
    let objects = objects();
    let kinds: BTreeSet<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for kind in ["ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"] {
        assert!(kinds.contains(kind), "deploy/ has no {kind}");
    }
    // Volumes name objects that exist.
    for d in objects.iter().filter(|o| o["kind"] == "Deployment") {
        for v in d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = v["configMap"]["name"].as_str() {
                find(&objects, "ConfigMap", name);
            }
            if let Some(name) = v["persistentVolumeClaim"]["claimName"].as_str() {
                find(&objects, "PersistentVolumeClaim", name);
            }
        }
    }
    // Selectors select their own pods.
    for d in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in d["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                &labels[k], v,
                "Deployment {}: selector {k} does not match its pods",
                d["metadata"]["name"]
            );
        }
    }
}

#[test]
fn the_sidecar_args_run_the_configmap_config_which_idemproxy_check_accepts() {
    let objects = objects();
    let s = sidecar_config(&objects);
    let (code, out, err) = run_cli(&["check", "--config", s.file.to_str().unwrap()], &[], &repo());
    assert_eq!(code, 0, "idemproxy check rejects the ConfigMap's config: {err}");
    assert!(out.contains("config OK"), "{out}");
    assert_eq!(s.args.first().map(String::as_str), Some("run"));
}

#[test]
fn the_store_url_reaches_the_redis_container_through_its_service() {
    let objects = objects();
    let s = sidecar_config(&objects);
    // Several replicas need the shared store (SPEC §5).
    let StoreConfig::Redis(redis) = &s.config.store else {
        panic!("the sidecar's store is not Redis: replicas would not share keys");
    };
    let url: http::Uri = redis.url.as_deref().expect("store.url").parse().unwrap();
    let service = find(&objects, "Service", url.host().unwrap());
    let port = url.port_u16().unwrap_or(6379);
    let sp = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("Service {} has no port {port}", url.host().unwrap()));
    let backing = objects
        .iter()
        .find(|d| selects(service, d))
        .expect("the Redis Service selects no Deployment");
    let (_, redis_port) =
        pod_port(backing, &sp["targetPort"]).expect("the Redis Service's targetPort is no container port");
    let redis_args: Vec<&str> = containers(backing)[0]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let listens = redis_args
        .iter()
        .position(|a| *a == "--port")
        .map_or(6379, |i| redis_args[i + 1].parse().unwrap());
    assert_eq!(
        redis_port, listens,
        "the Redis container port is not the port redis-server listens on"
    );
}

#[test]
fn ports_agree_from_the_service_through_the_sidecar_to_the_app() {
    let objects = objects();
    let s = sidecar_config(&objects);
    let (deployment, _) = sidecar(&objects);
    let service = objects
        .iter()
        .find(|svc| svc["kind"] == "Service" && selects(svc, deployment))
        .expect("no Service selects the app's pods");
    for p in service["spec"]["ports"].as_array().unwrap() {
        let (container, port) = pod_port(deployment, &p["targetPort"])
            .unwrap_or_else(|| panic!("the Service's targetPort {} is no container port", p["targetPort"]));
        assert_eq!(container, "idemproxy", "the Service reaches the app without the proxy");
        assert_eq!(
            port,
            s.config.server.listen.port(),
            "the Service's port is not server.listen"
        );
    }
    // The upstream is the app container, in the same pod, on loopback.
    let up = &s.config.upstream.url;
    assert!(
        matches!(up.host(), Some("127.0.0.1" | "localhost")),
        "upstream.url {up} is not in the pod"
    );
    let (container, _) = pod_port(deployment, &Value::from(up.port_u16().unwrap_or(80)))
        .unwrap_or_else(|| panic!("no container of the pod listens on upstream.url's port ({up})"));
    assert_ne!(container, "idemproxy");
    // SIGTERM drains within shutdown_grace, which must end before the kubelet's SIGKILL.
    let kill_after = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        s.config.server.shutdown_grace < Duration::from_secs(kill_after),
        "server.shutdown_grace {:?} is not below terminationGracePeriodSeconds {kill_after}",
        s.config.server.shutdown_grace
    );
}

#[tokio::test]
async fn the_probes_hit_admin_paths_that_answer_on_a_live_proxy() {
    let objects = objects();
    let s = sidecar_config(&objects);
    let (_, container) = sidecar(&objects);
    let admin = s.config.server.admin_listen;

    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    assert_eq!(
        c.get(&proxy.admin_url("/no-such-path")).await.status,
        404,
        "the admin API answers anything"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &container[probe];
        let (port, got) = if let Some(cmd) = p["exec"]["command"].as_array() {
            // Run inside the container: the admin listener may stay on loopback.
            let url: http::Uri = cmd
                .iter()
                .filter_map(Value::as_str)
                .find(|a| a.starts_with("http://"))
                .unwrap_or_else(|| panic!("{probe} execs no http:// URL: {cmd:?}"))
                .parse()
                .unwrap();
            assert_eq!(cmd[0], "curl", "{probe}: the image has curl, not {}", cmd[0]);
            assert!(
                cmd.iter()
                    .any(|a| a.as_str().is_some_and(|a| a.starts_with('-') && a.contains('f'))),
                "{probe}: curl without -f succeeds on a 503"
            );
            let host: std::net::IpAddr = url.host().unwrap().parse().unwrap();
            assert!(
                host.is_loopback() || host == admin.ip() || admin.ip().is_unspecified(),
                "{probe} calls {host}, the admin API listens on {admin}"
            );
            (url.port_u16().unwrap(), url.path().to_owned())
        } else if p["httpGet"].is_object() {
            // From the kubelet, to the pod IP: loopback is out of reach.
            assert!(
                !admin.ip().is_loopback(),
                "{probe} uses httpGet but admin_listen {admin} is loopback only"
            );
            let port = pod_port(sidecar(&objects).0, &p["httpGet"]["port"])
                .expect("httpGet port")
                .1;
            (port, p["httpGet"]["path"].as_str().unwrap().to_owned())
        } else {
            panic!("the sidecar has no {probe}");
        };
        assert_eq!(
            port,
            admin.port(),
            "{probe} calls port {port}, the admin API listens on {admin}"
        );
        // Liveness on /readyz would restart pods during a Redis outage;
        // readiness on /healthz would keep them in the Service.
        assert_eq!(got, path, "{probe} must call {path}");
        assert_eq!(
            c.get(&proxy.admin_url(&got)).await.status,
            200,
            "{probe}'s {got} does not answer 200"
        );
    }
}

#[test]
fn the_image_user_is_numeric_so_run_as_non_root_can_verify_it() {
    let objects = objects();
    let (_, container) = sidecar(&objects);
    if container["securityContext"]["runAsNonRoot"] != true || container["securityContext"]["runAsUser"].is_u64() {
        return;
    }
    let user = dockerfile("USER ");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "the Dockerfile's USER {user:?} is not a numeric non-root uid: the kubelet refuses runAsNonRoot with a named user"
    );
}
