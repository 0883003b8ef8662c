//! The deployment files say only what the binaries accept: the Kubernetes manifests and the
//! compose file parse, every flag and `DLB_*` variable they give appears in that binary's own
//! `--help`, probes and Services point at the ports the containers listen on, DNS discovery
//! names a headless Service, and the Dockerfile builds every binary they run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

/// What a binary accepts, from its own `--help` (and `SUBCOMMAND --help`).
#[derive(Default)]
struct Accepts {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn accepts(binary: &str, subcommand: Option<&str>) -> Accepts {
    let bin = dlb::testing::workspace_binary(binary);
    let output = Command::new(&bin)
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success(), "{binary} --help failed");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut accepts = Accepts::default();
    for word in help.split(|c: char| c.is_whitespace() || c == ',') {
        if let Some(flag) = word.strip_prefix("--") {
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            accepts.flags.insert(flag);
        }
    }
    for part in help.split("[env: ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        accepts.env.insert(name);
    }
    assert!(
        !accepts.flags.is_empty() && !accepts.env.is_empty(),
        "{help}"
    );
    accepts
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks `args` against what `binary` accepts; returns flag -> value.
fn check_args(origin: &str, binary: &str, args: &[String]) -> BTreeMap<String, String> {
    let accepted = accepts(binary, None);
    let mut given = BTreeMap::new();
    for arg in args {
        let Some(flag) = arg.strip_prefix("--") else {
            panic!("{origin}: {arg:?} is not a --flag (write --flag=value)");
        };
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        assert!(
            accepted.flags.contains(name),
            "{origin}: {binary} has no --{name} (see {binary} --help)"
        );
        given.insert(name.to_owned(), value.to_owned());
    }
    given
}

fn check_env(origin: &str, binary: &str, names: impl IntoIterator<Item = String>) {
    let accepted = accepts(binary, None);
    for name in names {
        if name.starts_with("DLB_") {
            assert!(
                accepted.env.contains(&name),
                "{origin}: {binary} reads no {name} (see {binary} --help)"
            );
        }
    }
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn binary_of(command: &Yaml) -> String {
    let program = strings(command).first().cloned().expect("a command");
    program.rsplit('/').next().unwrap().to_owned()
}

#[test]
fn kubernetes_manifests_name_real_flags_probes_and_ports() {
    let mut binaries = BTreeSet::new();
    let mut container_ports: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut services: Vec<Yaml> = Vec::new();
    let mut dns_targets: Vec<(String, i64)> = Vec::new();
    for file in ["redis", "compute", "gateway", "control", "ui"] {
        let path = format!("deploy/k8s/{file}.yaml");
        for doc in load(&path) {
            match doc["kind"].as_str() {
                Some("Service") => services.push(doc),
                Some("Deployment") => {
                    let app = doc["spec"]["template"]["metadata"]["labels"]["app"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    assert_eq!(
                        doc["spec"]["selector"]["matchLabels"]["app"].as_str(),
                        Some(app.as_str()),
                        "{path}: selector matches the pod labels"
                    );
                    for container in doc["spec"]["template"]["spec"]["containers"]
                        .as_vec()
                        .unwrap()
                    {
                        let ports: BTreeSet<i64> = container["ports"]
                            .as_vec()
                            .unwrap()
                            .iter()
                            .map(|p| p["containerPort"].as_i64().unwrap())
                            .collect();
                        container_ports.insert(app.clone(), ports.clone());
                        if container["image"].as_str() == Some("redis:7") {
                            continue;
                        }
                        let binary = binary_of(&container["command"]);
                        let origin = format!("{path} ({binary})");
                        let given = check_args(&origin, &binary, &strings(&container["args"]));
                        check_env(
                            &origin,
                            &binary,
                            container["env"]
                                .as_vec()
                                .unwrap()
                                .iter()
                                .map(|e| e["name"].as_str().unwrap().to_owned()),
                        );
                        let listen = port_of(&given["listen"]);
                        assert!(
                            ports.contains(&listen),
                            "{origin}: --listen port is a containerPort"
                        );
                        for probe in ["readinessProbe", "livenessProbe"] {
                            let probe = &container[probe];
                            if probe.is_badvalue() {
                                continue;
                            }
                            let port = probe["grpc"]["port"]
                                .as_i64()
                                .or_else(|| probe["httpGet"]["port"].as_i64())
                                .unwrap();
                            assert_eq!(port, listen, "{origin}: probes the port it listens on");
                        }
                        if binary != "dlb-ui" {
                            assert!(
                                !container["readinessProbe"]["grpc"].is_badvalue(),
                                "{origin}: a gRPC readiness probe (grpc.health.v1)"
                            );
                        }
                        if let Some(target) =
                            given.get("discover").and_then(|d| d.strip_prefix("dns:"))
                        {
                            let (name, port) = target.rsplit_once(':').unwrap();
                            dns_targets.push((name.to_owned(), port.parse().unwrap()));
                        }
                        binaries.insert(binary);
                    }
                }
                other => panic!("{path}: unexpected kind {other:?}"),
            }
        }
    }
    // Every Service sends traffic to ports its pods open.
    for service in &services {
        let name = service["metadata"]["name"].as_str().unwrap();
        let app = service["spec"]["selector"]["app"].as_str().unwrap();
        let open = container_ports
            .get(app)
            .unwrap_or_else(|| panic!("Service {name} selects app {app}, which no Deployment has"));
        for port in service["spec"]["ports"].as_vec().unwrap() {
            let target = port["targetPort"].as_i64().unwrap();
            assert!(
                open.contains(&target),
                "Service {name}: targetPort {target} is open in {app}"
            );
        }
    }
    // DNS discovery names a headless Service, on its port.
    assert!(!dns_targets.is_empty(), "the gateway discovers by DNS");
    for (name, port) in dns_targets {
        let service = services
            .iter()
            .find(|s| s["metadata"]["name"].as_str() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("--discover names {name}, which is no Service"));
        assert_eq!(
            service["spec"]["clusterIP"].as_str(),
            Some("None"),
            "{name} is headless"
        );
        let ports: Vec<i64> = service["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert!(ports.contains(&port), "{name} serves port {port}");
    }
    assert_dockerfile_builds(&binaries);
}

#[test]
fn the_compose_file_names_real_flags_health_checks_and_ports() {
    let doc = &load("deploy/compose.yaml")[0];
    let health = accepts("dlb", Some("health"));
    let mut binaries = BTreeSet::new();
    let services = doc["services"].as_hash().unwrap();
    assert!(
        services.len() >= 7,
        "redis, three computes, two gateways, ui"
    );
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let service = &with_merge_keys(service);
        if service["image"].as_str() == Some("redis:7") {
            continue;
        }
        let binary = binary_of(&service["entrypoint"]);
        let origin = format!("deploy/compose.yaml ({name})");
        let given = check_args(&origin, &binary, &strings(&service["command"]));
        check_env(
            &origin,
            &binary,
            service["environment"]
                .as_hash()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
        let listen = port_of(&given["listen"]);
        if let Some(advertise) = given.get("advertise") {
            assert_eq!(
                advertise,
                &format!("{name}:{listen}"),
                "{origin}: advertises itself"
            );
        }
        let check = strings(&service["healthcheck"]["test"]);
        if !check.is_empty() {
            assert_eq!(
                &check[..3],
                ["CMD", "/usr/local/bin/dlb", "health"],
                "{origin}"
            );
            assert!(
                health.flags.contains(check[3].trim_start_matches("--")),
                "{origin}"
            );
            assert_eq!(
                port_of(&check[4]),
                listen,
                "{origin}: checks the port it listens on"
            );
            binaries.insert("dlb".to_owned());
        }
        for mapping in strings(&service["ports"]) {
            let container_port: i64 = mapping.rsplit(':').next().unwrap().parse().unwrap();
            assert!(
                mapping.starts_with("127.0.0.1:"),
                "{origin}: published on loopback only"
            );
            assert_eq!(
                container_port, listen,
                "{origin}: publishes the port it listens on"
            );
        }
        binaries.insert(binary);
    }
    assert_dockerfile_builds(&binaries);
}

/// `service` with its YAML merge key (`<<: *anchor`) applied: its own keys win.
fn with_merge_keys(service: &Yaml) -> Yaml {
    let mut out = service["<<"].as_hash().cloned().unwrap_or_default();
    for (key, value) in service.as_hash().unwrap() {
        if key.as_str() != Some("<<") {
            out.insert(key.clone(), value.clone());
        }
    }
    Yaml::Hash(out)
}

fn assert_dockerfile_builds(binaries: &BTreeSet<String>) {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for binary in binaries {
        assert!(
            dockerfile.contains(&format!("--bin {binary} "))
                || dockerfile.contains(&format!("--bin {binary}\n")),
            "the Dockerfile builds {binary}"
        );
        assert!(dlb::testing::workspace_binary(binary).exists());
    }
}
