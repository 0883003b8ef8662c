//! The control service with real `dlb-compute` processes: lifecycle against `/proc`, draining
//! under load through the gateway, crashes and restarts, no orphans, control restarts, grpcurl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::events::EventLogArgs;
use dlb::proto::v1::{
    FibonacciRequest, GetLoadRequest, Instance, InstanceRequest, InstanceState,
    ListInstancesRequest, StatsRequest, StopInstanceRequest, WatchInstancesRequest,
    control_client::ControlClient, gateway_client::GatewayClient, load_client::LoadClient,
    operations_client::OperationsClient,
};
use dlb::testing::{RedisServer, channel, process_gone, workspace_binary};
use dlb_control::Config;
use dlb_control::config::Restart;
use tonic::Code;
use tonic::transport::Channel;

use dlb::testing::PATIENCE;

fn config(instances: usize) -> Config {
    Config::for_tests(workspace_binary("dlb-compute"), instances)
}

async fn list(control: &Channel) -> BTreeMap<String, Instance> {
    ControlClient::new(control.clone())
        .list_instances(ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect()
}

async fn wait_states(
    control: &Channel,
    want: &[(&str, InstanceState)],
) -> BTreeMap<String, Instance> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let now = list(control).await;
            if want
                .iter()
                .all(|(id, state)| now.get(*id).is_some_and(|i| i.state() == *state))
            {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("states {want:?}"))
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_matches_the_real_processes() {
    let control = dlb_control::testing::start(config(3)).await.unwrap();
    let ch = channel(&control.uri()).await;
    let serving = InstanceState::Serving;
    let all = wait_states(&ch, &[("A", serving), ("B", serving), ("C", serving)]).await;
    for (id, instance) in &all {
        let cmd = cmdline(instance.pid);
        assert!(
            cmd.contains("dlb-compute") && cmd.contains(&format!("--id {id} ")),
            "{cmd}"
        );
        assert!(cmd.contains("--exit-with-parent"), "{cmd}");
    }
    let mut client = ControlClient::new(ch.clone());

    // Stop (drain) B: its process is gone.
    let b_pid = all["B"].pid;
    let b = client
        .stop_instance(StopInstanceRequest {
            id: "B".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state(), InstanceState::Stopped);
    assert_eq!(b.pid, 0);
    assert!(process_gone(b_pid));

    // Start B again: a new process on the same address.
    let b2 = client
        .start_instance(InstanceRequest { id: "B".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b2.state(), InstanceState::Serving);
    assert_eq!(b2.address, all["B"].address);
    assert!(!process_gone(b2.pid) && b2.pid != b_pid);

    // Starting a running instance changes nothing.
    let a = client
        .start_instance(InstanceRequest { id: "A".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.pid, all["A"].pid);

    // Kill C at once.
    let c = client
        .stop_instance(StopInstanceRequest {
            id: "C".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state(), InstanceState::Stopped);
    assert!(process_gone(all["C"].pid));

    // Add D, then remove it (draining first).
    let d = client
        .add_instance(dlb::proto::v1::AddInstanceRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.id, "D");
    assert_eq!(d.state(), InstanceState::Serving);
    assert!(cmdline(d.pid).contains("--id D "));
    client
        .remove_instance(InstanceRequest { id: "D".into() })
        .await
        .unwrap();
    assert!(process_gone(d.pid));
    assert!(!list(&ch).await.contains_key("D"));

    // Unknown ids are NOT_FOUND, with what to do.
    let status = client
        .stop_instance(StopInstanceRequest {
            id: "Q".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("known: A, B, C"),
        "{}",
        status.message()
    );
    let status = client
        .start_instance(InstanceRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The list says exactly what runs.
    let now = list(&ch).await;
    for instance in now.values() {
        if instance.pid != 0 {
            assert!(!process_gone(instance.pid), "{instance:?}");
        }
    }
    let pids: Vec<u32> = now.values().map(|i| i.pid).filter(|p| *p != 0).collect();
    control.shutdown().await.unwrap();
    for pid in pids {
        assert!(process_gone(pid), "no instance outlives control ({pid})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_an_instance_under_load_through_the_gateway_fails_no_call() {
    let control = dlb_control::testing::start(config(3)).await.unwrap();
    let ch = channel(&control.uri()).await;
    let serving = InstanceState::Serving;
    let all = wait_states(&ch, &[("A", serving), ("B", serving), ("C", serving)]).await;
    let redis = RedisServer::start();
    let mut gw_config = dlb_gateway::Config::for_tests(vec![]);
    gw_config.control = Some(control.uri());
    gw_config.events = EventLogArgs {
        redis: redis.url(),
        ..EventLogArgs::disabled()
    };
    let gateway = dlb_gateway::testing::RunningGateway::start(gw_config, vec![], false)
        .await
        .unwrap();
    let gw = channel(&gateway.uri()).await;
    tokio::time::timeout(PATIENCE, async {
        loop {
            let stats = GatewayClient::new(gw.clone())
                .stats(StatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if stats
                .instances
                .iter()
                .filter(|i| i.state == "serving")
                .count()
                == 3
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();

    // A slow call, and where it runs.
    let mut client = OperationsClient::new(gw.clone()).max_decoding_message_size(64 << 20);
    let slow =
        tokio::spawn(async move { client.fibonacci(FibonacciRequest { n: 10_000_000 }).await });
    let busy = tokio::time::timeout(PATIENCE, async {
        loop {
            for (id, instance) in &all {
                let report =
                    LoadClient::new(channel(&format!("http://{}", instance.address)).await)
                        .get_load(GetLoadRequest {})
                        .await
                        .unwrap()
                        .into_inner();
                if report.busy_workers > 0 {
                    return id.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();

    let progress = Arc::new(Progress::default());
    let load = dlb::testing::load(gateway.addr, 8, 2_000);
    let run = tokio::spawn(bench::run(load.clone(), Arc::clone(&progress)));
    while progress.completed.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stopped = ControlClient::new(ch.clone())
        .stop_instance(StopInstanceRequest {
            id: busy.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state(), InstanceState::Stopped);
    let fib = slow.await.unwrap().expect("the slow call completes");
    assert_eq!(fib.metadata().get("x-served-by").unwrap(), busy.as_str());
    assert_eq!(fib.into_inner().digits, 2_089_877);
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.ok, 2_000, "{:?}", report.errors);

    // Nothing new goes to it.
    let after = bench::run(
        BenchConfig {
            requests: Some(300),
            ..load
        },
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(after.ok, 300);
    assert_eq!(
        after.per_instance.get(&busy),
        None,
        "{:?}",
        after.per_instance
    );
    // An instance's going is in the gateway's log, as its joining is (one stopped with no
    // load running: the calls' events would soon push it out of the log's latest 1,000).
    let quiet = all.keys().find(|id| **id != busy).unwrap().clone();
    ControlClient::new(ch.clone())
        .stop_instance(StopInstanceRequest {
            id: quiet.clone(),
            force: false,
        })
        .await
        .unwrap();
    let reader = dlb::events::reader::EventReader::new(&redis.url()).unwrap();
    let left = tokio::time::timeout(PATIENCE, async {
        loop {
            let events = reader.recent(1_000).await.unwrap_or_default();
            if let Some(left) = events.into_iter().find(|e| {
                e.service == "gateway"
                    && e.message == "left"
                    && e.fields.get("instance") == Some(&quiet)
            }) {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway logs the instance leaving");
    assert!(left.fields.contains_key("addr"), "{left:?}");
    gateway.shutdown().await.unwrap();
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_reported_logged_and_restarted() {
    let redis = RedisServer::start();
    let mut cfg = config(1);
    cfg.restart = Restart::OnFailure;
    cfg.id = "h1-control".to_owned();
    cfg.events = EventLogArgs {
        redis: redis.url(),
        ..EventLogArgs::disabled()
    };
    let control = dlb_control::testing::start(cfg).await.unwrap();
    let ch = channel(&control.uri()).await;
    let before = wait_states(&ch, &[("A", InstanceState::Serving)]).await["A"].clone();
    let mut watch = ControlClient::new(ch.clone())
        .watch_instances(WatchInstancesRequest {})
        .await
        .unwrap()
        .into_inner();

    let status = Command::new("kill")
        .args(["-KILL", &before.pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(PATIENCE, async {
        loop {
            let list = watch.message().await.unwrap().unwrap();
            if list
                .instances
                .iter()
                .any(|i| i.id == "A" && i.state() == InstanceState::Crashed)
            {
                let a = list.instances.iter().find(|i| i.id == "A").unwrap();
                assert!(a.last_error.contains("signal"), "{a:?}");
                return;
            }
        }
    })
    .await
    .expect("A reported crashed");
    let after = tokio::time::timeout(PATIENCE, async {
        loop {
            let list = watch.message().await.unwrap().unwrap();
            if let Some(a) = list
                .instances
                .iter()
                .find(|i| i.id == "A" && i.state() == InstanceState::Serving)
            {
                return a.clone();
            }
        }
    })
    .await
    .expect("A restarted");
    assert_eq!(after.restarts, 1);
    assert_ne!(after.pid, before.pid);
    assert!(!process_gone(after.pid));

    let reader = dlb::events::reader::EventReader::new(&redis.url()).unwrap();
    let messages = tokio::time::timeout(PATIENCE, async {
        loop {
            let events = reader.recent(50).await.unwrap_or_default();
            let messages: Vec<String> = events
                .iter()
                .filter(|e| e.service == "control")
                .map(|e| e.message.clone())
                .collect();
            if messages.contains(&"crashed".to_owned())
                && messages.contains(&"restarted".to_owned())
            {
                // The crash says how it ended and the instance's last words (its log lines
                // go to stderr: "listening" at least).
                let crashed = events.iter().find(|e| e.message == "crashed").unwrap();
                assert!(crashed.fields.contains_key("status"), "{crashed:?}");
                // Written under this control's own name.
                assert_eq!(crashed.instance, "h1-control", "{crashed:?}");
                assert!(
                    crashed
                        .fields
                        .get("stderr")
                        .is_some_and(|s| s.contains("listening")),
                    "{crashed:?}"
                );
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("crashed and restarted are logged");
    assert!(messages.contains(&"started".to_owned()), "{messages:?}");
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_control_leaves_no_instance_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlb-control"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--first-port",
            "0",
            "--instances",
            "3",
            "--redis",
            "none",
        ])
        .arg("--compute-bin")
        .arg(workspace_binary("dlb-compute"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = dlb::testing::listening_addr(&mut child);
    let ch = channel(&format!("http://{addr}")).await;
    let serving = InstanceState::Serving;
    let all = wait_states(&ch, &[("A", serving), ("B", serving), ("C", serving)]).await;
    let pids: Vec<u32> = all.values().map(|i| i.pid).collect();
    assert!(pids.iter().all(|p| !process_gone(*p)));

    child.kill().unwrap(); // SIGKILL: control gets no chance to clean up
    child.wait().unwrap();
    tokio::time::timeout(Duration::from_secs(2), async {
        while !pids.iter().all(|p| process_gone(*p)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        for p in &pids {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        panic!("instances outlived a SIGKILLed control by 2 s: {pids:?}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_through_a_control_restart_and_follows_the_new_one() {
    // One instance the gateway knows statically, and control's.
    let fixed = dlb_compute::testing::start(dlb_compute::Config::for_tests("X"))
        .await
        .unwrap();
    let control = dlb_control::testing::start(config(1)).await.unwrap();
    let control_addr = control.addr;
    let ch = channel(&control.uri()).await;
    wait_states(&ch, &[("A", InstanceState::Serving)]).await;
    let mut gw_config = dlb_gateway::Config::for_tests(vec![]);
    gw_config.control = Some(control.uri());
    let gateway = dlb_gateway::testing::RunningGateway::start(
        gw_config,
        vec![dlb_gateway::config::Backend {
            id: "X".into(),
            addr: fixed.addr.to_string(),
        }],
        false,
    )
    .await
    .unwrap();
    let gw = channel(&gateway.uri()).await;
    let serving_ids = |gw: Channel| async move {
        let stats = GatewayClient::new(gw)
            .stats(StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut ids: Vec<String> = stats
            .instances
            .into_iter()
            .filter(|i| i.state == "serving")
            .map(|i| i.instance)
            .collect();
        ids.sort();
        ids
    };
    tokio::time::timeout(PATIENCE, async {
        while serving_ids(gw.clone()).await != ["A", "X"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();

    let progress = Arc::new(Progress::default());
    let load = BenchConfig {
        connections: 1,
        ..dlb::testing::load(gateway.addr, 4, 3_000)
    };
    let run = tokio::spawn(bench::run(load, Arc::clone(&progress)));
    while progress.completed.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Control goes away (draining its instance), then comes back with two instances.
    control.shutdown().await.unwrap();
    let mut again = config(2);
    again.listen = control_addr;
    let control = dlb_control::testing::start(again).await.unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.ok, 3_000, "{:?}", report.errors);
    tokio::time::timeout(PATIENCE, async {
        while serving_ids(gw.clone()).await != ["A", "B", "X"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway follows the new control");
    gateway.shutdown().await.unwrap();
    control.shutdown().await.unwrap();
    fixed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_control() {
    let control = dlb_control::testing::start(config(1)).await.unwrap();
    let ch = channel(&control.uri()).await;
    wait_states(&ch, &[("A", InstanceState::Serving)]).await;
    let addr = control.addr.to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(dlb::testing::grpcurl())
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let out = run(vec!["-plaintext".into(), addr.clone(), "list".into()])
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("dlb.v1.Control"),
        "{text}"
    );
    let out = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "dlb.v1.Control/ListInstances".into(),
    ])
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"SERVING\""),
        "{text}"
    );
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_say_why() {
    // A missing binary.
    let mut missing = config(0);
    missing.compute_bin = Some("/nonexistent/dlb-compute".into());
    let control = dlb_control::testing::start(missing).await.unwrap();
    let ch = channel(&control.uri()).await;
    let status = ControlClient::new(ch.clone())
        .add_instance(dlb::proto::v1::AddInstanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("cannot run /nonexistent/dlb-compute")
            && status.message().contains("--compute-bin"),
        "{}",
        status.message()
    );
    // A failed add adds nothing, however often it is tried.
    let again = ControlClient::new(ch.clone())
        .add_instance(dlb::proto::v1::AddInstanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unavailable);
    assert!(list(&ch).await.is_empty(), "{:?}", list(&ch).await);
    control.shutdown().await.unwrap();

    // A port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut busy = config(0);
    busy.first_port = taken.local_addr().unwrap().port();
    let control = dlb_control::testing::start(busy).await.unwrap();
    let ch = channel(&control.uri()).await;
    let status = ControlClient::new(ch.clone())
        .add_instance(dlb::proto::v1::AddInstanceRequest {})
        .await
        .unwrap_err();
    assert!(
        status.message().contains("did not start") && status.message().contains("cannot listen"),
        "{}",
        status.message()
    );
    // The reason is in the answer (the entry is not kept to hold it).
    assert!(
        status.message().contains("Address already in use"),
        "{}",
        status.message()
    );
    assert!(list(&ch).await.is_empty(), "{:?}", list(&ch).await);
    control.shutdown().await.unwrap();
}
