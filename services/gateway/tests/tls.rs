//! Mutual TLS across the mesh, with certificates from `dlb certs init` (`dlb::tls::init`): a
//! real `dlb-control` process starting its instances with TLS, a gateway following it over TLS,
//! and clients with and without the right credentials knocking at each of the three.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::proto::v1::{
    ListInstancesRequest, ReverseRequest, control_client::ControlClient,
    operations_client::OperationsClient,
};
use dlb::tls::{ClientTls, TlsArgs};
use dlb_gateway::Config;
use dlb_gateway::testing::RunningGateway;
use support::{ComputeProcess, PATIENCE, wait_serving};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A fresh directory with a CA and every service's certificate.
fn certs(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dlb-tls-test-{name}-{}-{}",
        std::process::id(),
        dlb::testing::free_port()
    ));
    dlb::tls::init(&dir, &[]).unwrap();
    dir
}

fn client(args: TlsArgs) -> ClientTls {
    args.load().unwrap().unwrap().client().unwrap()
}

/// A channel to `addr` with `tls` (plaintext when `None`), checking the server's name as
/// `domain` when given.
async fn dial(addr: &str, tls: Option<&ClientTls>, domain: Option<&str>) -> Channel {
    let endpoint = match (tls, domain) {
        (Some(tls), Some(domain)) => {
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls.config(Some(domain)))
                .unwrap()
        }
        _ => dlb::dial::endpoint_tls(addr, tls).unwrap(),
    };
    endpoint.connect_lazy()
}

/// The health check's outcome: `Ok` or the error as the client prints it.
async fn check(channel: Channel) -> Result<(), String> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        HealthClient::new(channel).check(request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(dlb::client::status_message(&status)),
        Err(_) => Err("no answer within 5 s".to_owned()),
    }
}

/// A `dlb-compute` process with mutual TLS (compute.pem of `dir`), no event log, and `extra`
/// flags.
fn compute_with_tls(dir: &Path, id: &str, extra: &[&str]) -> ComputeProcess {
    let tls = dlb::tls::args_for(dir, "compute").to_args();
    let flags: Vec<&str> = ["--redis", "none"]
        .into_iter()
        .chain(extra.iter().copied())
        .chain(tls.iter().map(String::as_str))
        .collect();
    ComputeProcess::start_with(&[], id, "127.0.0.1:0", &flags)
}

/// `dlb-control` with mutual TLS, starting `instances` instances (which get its TLS flags).
struct Control {
    child: Child,
    addr: String,
}

impl Control {
    fn start(dir: &Path, instances: usize) -> Self {
        support::compute_binary();
        let tls = dlb::tls::args_for(dir, "control").to_args();
        let mut child = Command::new(dlb::testing::workspace_binary("dlb-control"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--first-port",
                "0",
                "--redis",
                "none",
            ])
            .args(["--instances", &instances.to_string()])
            .args(&tls)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = dlb::testing::listening_addr(&mut child);
        Self { child, addr }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // SIGTERM: control drains and stops its instances.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_members_talk_and_strangers_are_refused_at_every_service() {
    let dir = certs("main");
    let other = certs("other");
    let control = Control::start(&dir, 2);
    let trusted = client(dlb::tls::args_for(&dir, "client"));

    // The gateway follows control over TLS and calls the instances over TLS.
    let mut config = Config::for_tests(vec![]);
    config.tls = dlb::tls::args_for(&dir, "gateway");
    config.control = Some(format!("http://{}", control.addr));
    let gateway = RunningGateway::start(config, vec![], false).await.unwrap();
    let gateway_addr = gateway.addr.to_string();
    let gw = dial(&gateway_addr, Some(&trusted), None).await;
    wait_serving(&gw, &["A", "B"], PATIENCE).await;
    let mut operations = OperationsClient::new(gw.clone());
    for _ in 0..4 {
        let reply = operations
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().text, "olleh");
    }

    // Control lists its instances to the dashboard's certificate (not to client.pem).
    let ui = client(dlb::tls::args_for(&dir, "ui"));
    let instances = ControlClient::new(dial(&control.addr, Some(&ui), None).await)
        .list_instances(ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances;
    let compute_addr = instances[0].address.clone();

    let no_certificate = client(TlsArgs {
        tls_ca: Some(dir.join("ca.pem")),
        ..TlsArgs::default()
    });
    let foreign_certificate = client(TlsArgs {
        tls_cert: Some(other.join("client.pem")),
        tls_key: Some(other.join("client.key")),
        tls_ca: Some(dir.join("ca.pem")),
        tls_server_name: None,
    });
    for (service, addr) in [
        ("compute", compute_addr.as_str()),
        ("gateway", gateway_addr.as_str()),
        ("control", control.addr.as_str()),
    ] {
        assert_eq!(
            check(dial(addr, Some(&trusted), None).await).await,
            Ok(()),
            "{service}: a client with a certificate from the mesh's CA gets in"
        );

        let error = check(dial(addr, Some(&no_certificate), None).await)
            .await
            .expect_err("refused without a client certificate");
        let hint = dlb::tls::hint(&error, Some(&no_certificate));
        assert!(
            hint.is_some_and(|h| h.contains("client certificate")),
            "{service}, no certificate: {error} (hint {hint:?})"
        );

        let error = check(dial(addr, Some(&foreign_certificate), None).await)
            .await
            .expect_err("refused with a certificate from another CA");
        let hint = dlb::tls::hint(&error, Some(&foreign_certificate));
        assert!(
            hint.is_some_and(|h| h.contains("refused this client certificate")),
            "{service}, other CA: {error} (hint {hint:?})"
        );

        let error = check(dial(addr, None, None).await)
            .await
            .expect_err("refused in plaintext");
        let hint = dlb::tls::hint(&error, None);
        assert!(
            hint.is_some_and(|h| h.contains("may require TLS")),
            "{service}, plaintext: {error} (hint {hint:?})"
        );

        // The client checks the server too: a certificate for other names is refused.
        let error = check(dial(addr, Some(&trusted), Some("wrong.example")).await)
            .await
            .expect_err("a server certificate for another name is refused");
        assert!(
            error.contains("not valid for name \"wrong.example\""),
            "{service}: {error}"
        );
        assert!(
            dlb::tls::hint(&error, Some(&trusted))
                .is_some_and(|h| h.contains("not valid for the name")),
            "{service}: {error}"
        );
        // And one from another CA.
        let wrong_ca = client(TlsArgs {
            tls_cert: Some(dir.join("client.pem")),
            tls_key: Some(dir.join("client.key")),
            tls_ca: Some(other.join("ca.pem")),
            tls_server_name: None,
        });
        let error = check(dial(addr, Some(&wrong_ca), None).await)
            .await
            .expect_err("a server certificate from another CA is refused");
        assert!(
            dlb::tls::hint(&error, Some(&wrong_ca))
                .is_some_and(|h| h.contains("not signed by the CA")),
            "{service}: {error}"
        );
    }

    // Still serving after all that.
    assert_eq!(check(gw.clone()).await, Ok(()));
    gateway.shutdown().await.unwrap();
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

/// A gateway with a policy of its own: each call decided by the identity in the caller's
/// certificate, refusals answered PERMISSION_DENIED naming the identity and the rule (never
/// who the rule allows), counted in /metrics; serving goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_policy_refuses_by_certificate_identity_and_counts_it() {
    let dir = certs("policy");
    let computes = [compute_with_tls(&dir, "A", &[])];
    let policy = dir.join("gateway.policy");
    std::fs::write(
        &policy,
        "# the operations to client.pem only\n\
         /dlb.v1.Operations/* = client\n\
         /grpc.health.v1.Health/* = *\n",
    )
    .unwrap();
    let mut config = Config::for_tests(vec![]);
    config.tls = dlb::tls::args_for(&dir, "gateway");
    config.authz.authz_policy = Some(policy);
    config.authz.allow = vec!["/dlb.v1.Gateway/Stats=ui".into()];
    let backends = computes.iter().map(ComputeProcess::backend).collect();
    let gateway = RunningGateway::start(config, backends, true).await.unwrap();
    let addr = gateway.addr.to_string();
    let as_client = dial(
        &addr,
        Some(&client(dlb::tls::args_for(&dir, "client"))),
        None,
    )
    .await;
    let as_ui = dial(&addr, Some(&client(dlb::tls::args_for(&dir, "ui"))), None).await;
    wait_serving(&as_ui, &["A"], PATIENCE).await;

    let reverse = |channel: Channel| async move {
        OperationsClient::new(channel)
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
    };
    assert_eq!(
        reverse(as_client.clone()).await.unwrap().into_inner().text,
        "olleh"
    );
    let status = reverse(as_ui.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "spiffe://dlb.local/ui may not call /dlb.v1.Operations/Reverse: the policy's rule \"/dlb.v1.Operations/*\" does not name it (gateway)"
    );
    // A method no rule matches: refused too (the gateway relays any service otherwise).
    let stats = dlb::proto::v1::gateway_client::GatewayClient::new(as_client.clone())
        .stats(dlb::proto::v1::StatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(stats.code(), tonic::Code::PermissionDenied, "{stats:?}");
    assert!(
        stats.message().starts_with("spiffe://dlb.local/client may not call /dlb.v1.Gateway/Stats: the policy's rule \"/dlb.v1.Gateway/Stats\""),
        "{}",
        stats.message()
    );
    // The rule added by --allow lets ui read the stats.
    dlb::proto::v1::gateway_client::GatewayClient::new(as_ui.clone())
        .stats(dlb::proto::v1::StatsRequest {})
        .await
        .unwrap();
    let metrics = tokio::task::spawn_blocking({
        let addr = gateway.metrics_addr.unwrap();
        move || dlb::testing::http_get(addr, "/metrics").unwrap()
    })
    .await
    .unwrap();
    assert!(
        metrics.contains("\ndlb_gateway_permission_denied_total 2\n"),
        "{metrics}"
    );
    // Serving goes on for the allowed caller.
    assert_eq!(reverse(as_client).await.unwrap().into_inner().text, "olleh");
    gateway.shutdown().await.unwrap();
    drop(computes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `binary` (`dlb-gateway`, `dlb-control`) with `args`, its TLS files from `dir` and
/// `extra`, and asserts that it refuses to start: it must exit, unsuccessfully, within 30 s (a
/// server that started anyway is killed and fails the test rather than hanging it). Gives its
/// stderr and stdout.
fn refused_start(binary: &str, args: &[&str], dir: &Path, extra: &[&str]) -> (String, String) {
    let role = binary.trim_start_matches("dlb-");
    let mut child = Command::new(dlb::testing::workspace_binary(binary))
        .args(args)
        .args(dlb::tls::args_for(dir, role).to_args())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary} {extra:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    (stderr, String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_stops_the_start_with_the_line_and_the_reason() {
    let dir = certs("bad-policy");
    let policy = dir.join("bad.policy");
    std::fs::write(
        &policy,
        "/dlb.v1.Operations/* = client\n/dlb.v1.Operations/* client\n",
    )
    .unwrap();
    let gateway = [
        "--listen",
        "127.0.0.1:0",
        "--redis",
        "none",
        "--backend",
        "A=127.0.0.1:1",
    ];
    let (stderr, _) = refused_start(
        "dlb-gateway",
        &gateway,
        &dir,
        &["--authz-policy", &policy.display().to_string()],
    );
    assert!(
        stderr.contains(&format!(
            "--authz-policy {} line 2: \"/dlb.v1.Operations/* client\" is not a rule",
            policy.display()
        )),
        "{stderr}"
    );
    // And a rule for a service control does not serve.
    support::compute_binary();
    let control = [
        "--listen",
        "127.0.0.1:0",
        "--instances",
        "0",
        "--redis",
        "none",
    ];
    let (stderr, _) = refused_start(
        "dlb-control",
        &control,
        &dir,
        &["--allow", "/dlb.v1.Contrl/*=operator"],
    );
    assert!(
        stderr.contains("this server serves no service dlb.v1.Contrl"),
        "{stderr}"
    );
    // And a method its service does not have: the gateway refuses to start.
    let (stderr, stdout) = refused_start(
        "dlb-gateway",
        &gateway,
        &dir,
        &["--allow", "/dlb.v1.Operations/Revers=client"],
    );
    assert!(
        stderr.contains("dlb.v1.Operations has no method Revers (it has IsPrime,"),
        "{stderr}"
    );
    // Refused before the port is taken: nothing says it listens.
    assert!(!stdout.contains("listening on"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_instance_under_load_loses_no_call_with_mutual_tls() {
    let dir = certs("failover");
    let mut computes: Vec<ComputeProcess> = ["A", "B", "C"]
        .iter()
        .map(|id| compute_with_tls(&dir, id, &[]))
        .collect();
    let mut config = Config::for_tests(vec![]);
    config.tls = dlb::tls::args_for(&dir, "gateway");
    let backends = computes.iter().map(ComputeProcess::backend).collect();
    let gateway = RunningGateway::start(config, backends, false)
        .await
        .unwrap();
    let trusted = client(dlb::tls::args_for(&dir, "client"));
    let gw = dial(&gateway.addr.to_string(), Some(&trusted), None).await;
    wait_serving(&gw, &["A", "B", "C"], PATIENCE).await;

    let progress = Arc::new(Progress::default());
    let load = BenchConfig {
        tls: Some(trusted.clone()),
        ..dlb::testing::load(gateway.addr, 32, 5_000)
    };
    let run = tokio::spawn(bench::run(load, Arc::clone(&progress)));
    tokio::time::timeout(PATIENCE, async {
        while progress.completed.load(Ordering::Relaxed) < 1_000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    computes[1].signal_and_wait("KILL");
    let report = run.await.unwrap().unwrap();
    assert!(
        report.errors.is_empty(),
        "failed calls: {:?} {:?}",
        report.errors,
        report.error_samples
    );
    assert_eq!(report.ok, 5_000);
    assert!(
        report.per_instance.contains_key("B"),
        "B served before it died"
    );

    // Restarted on the same address, with the same certificate: back in rotation.
    computes[1].restart();
    wait_serving(&gw, &["A", "B", "C"], Duration::from_secs(2)).await;
    gateway.shutdown().await.unwrap();
    drop(computes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_health_port_answers_health_only() {
    let dir = certs("health");
    let health_port = dlb::testing::free_port();
    let health_addr = format!("127.0.0.1:{health_port}");
    let compute = compute_with_tls(&dir, "A", &["--health-listen", health_addr.as_str()]);

    // A probe without TLS gets SERVING on the health port...
    let plain = dial(&health_addr, None, None).await;
    tokio::time::timeout(PATIENCE, async {
        while check(plain.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the health port answers in plaintext");
    // ...and nothing else there: the operations stay behind TLS.
    let status = OperationsClient::new(plain)
        .reverse(ReverseRequest {
            text: "hello".into(),
        })
        .await
        .expect_err("no operations on the health port");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    // The main port still refuses plaintext.
    assert!(check(dial(&compute.addr, None, None).await).await.is_err());
    drop(compute);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compute_instance_beyond_loopback_without_tls_warns_loudly() {
    let mut child = Command::new(support::compute_binary())
        .args(["--id", "W", "--listen", "0.0.0.0:0", "--redis", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let warning: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .scan(false, |done, line| {
            // Up to the warning's last line.
            if *done {
                return None;
            }
            *done = line.contains("listen on 127.0.0.1");
            Some(line)
        })
        .take(20)
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.join("\n");
    assert!(
        warning.contains("WARNING")
            && warning.contains("WITHOUT TLS")
            && warning.contains("bypassing the gateway"),
        "{warning}"
    );
}
