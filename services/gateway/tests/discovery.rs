//! Discovery beyond a static list: the Redis instance registry (real `redis-server`, real
//! `dlb-compute` processes registering themselves, several gateways following) and DNS (a real
//! `dnsmasq` on a free port on 127.0.0.1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dlb::registry::Registry;
use dlb::testing::RedisServer;
use dlb_gateway::Config;
use dlb_gateway::config::Discover;
use dlb_gateway::testing::RunningGateway;
use support::{ComputeProcess, PATIENCE, channel, served_by, stats, wait_serving};
use tonic::transport::Channel;

/// A gateway following the registry in `redis`.
async fn registry_gateway(redis: &RedisServer) -> (RunningGateway, Channel) {
    let mut config = Config::for_tests(vec![]);
    config.discover = Some(Discover::Redis);
    config.events.redis = redis.url();
    let gateway = RunningGateway::start(config, vec![], false).await.unwrap();
    let gw = channel(&gateway.uri()).await;
    (gateway, gw)
}

/// A compute instance that registers itself in `redis`.
async fn registered(id: &str, redis: &RedisServer, ttl_ms: u64) -> ComputeProcess {
    let ttl = ttl_ms.to_string();
    let compute = ComputeProcess::start_with(
        &[],
        id,
        "127.0.0.1:0",
        &[
            "--redis",
            &redis.url(),
            "--register",
            "--register-ttl-ms",
            &ttl,
        ],
    );
    // It registers just after it starts listening: wait for that, so tests start from a
    // registered instance.
    let registry = Registry::open(&redis.url()).unwrap();
    tokio::time::timeout(PATIENCE, async {
        while registry
            .snapshot()
            .await
            .ok()
            .and_then(|entries| entries.get(id).map(|e| e.address.clone()))
            .as_deref()
            != Some(compute.addr.as_str())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} registered within {PATIENCE:?}"));
    compute
}

/// Waits until the gateway lists exactly `ids` (in any state).
async fn wait_listed(gw: &Channel, ids: &[&str], bound: Duration) {
    let want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    tokio::time::timeout(bound, async {
        loop {
            let mut listed: Vec<String> = stats(gw)
                .await
                .instances
                .into_iter()
                .map(|i| i.instance)
                .collect();
            listed.sort();
            if listed == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("gateway lists {want:?} within {bound:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_a_registry_route_to_an_instance_registered_after_they_started() {
    let redis = RedisServer::start();
    let (first, gw1) = registry_gateway(&redis).await;
    let (second, gw2) = registry_gateway(&redis).await;
    wait_listed(&gw1, &[], PATIENCE).await;

    // Registered after both gateways started: both route to it, through the change
    // notification (sooner than the once-a-second re-read could).
    let a = registered("A", &redis, 5_000).await;
    let found = Instant::now();
    let notified = dlb::registry::RESYNC - Duration::from_millis(100);
    wait_serving(&gw1, &["A"], notified).await;
    wait_serving(&gw2, &["A"], notified.saturating_sub(found.elapsed())).await;
    eprintln!(
        "registered instance serving in both gateways after {:?}",
        found.elapsed()
    );
    assert_eq!(served_by(&gw1, 4).await, BTreeMap::from([("A".into(), 4)]));
    assert_eq!(served_by(&gw2, 4).await, BTreeMap::from([("A".into(), 4)]));

    // A second instance: exact round robin over both, in each gateway.
    let mut b = registered("B", &redis, 5_000).await;
    wait_serving(&gw1, &["A", "B"], Duration::from_secs(2)).await;
    wait_serving(&gw2, &["A", "B"], Duration::from_secs(2)).await;
    let both = BTreeMap::from([("A".into(), 10), ("B".into(), 10)]);
    assert_eq!(served_by(&gw1, 20).await, both);
    assert_eq!(served_by(&gw2, 20).await, both);
    let entry = &Registry::open(&redis.url())
        .unwrap()
        .snapshot()
        .await
        .unwrap()["B"];
    assert_eq!(entry.address, b.addr);
    assert_eq!(entry.version, env!("CARGO_PKG_VERSION"));

    // SIGTERM: B withdraws before it drains; both gateways drop it and keep serving.
    let status = b.signal_and_wait("TERM");
    assert_eq!(status.code(), Some(0));
    wait_listed(&gw1, &["A"], Duration::from_secs(2)).await;
    wait_listed(&gw2, &["A"], Duration::from_secs(2)).await;
    assert!(
        !Registry::open(&redis.url())
            .unwrap()
            .snapshot()
            .await
            .unwrap()
            .contains_key("B")
    );
    assert_eq!(served_by(&gw1, 3).await, BTreeMap::from([("A".into(), 3)]));

    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instance_leaves_the_registry_within_its_ttl() {
    let redis = RedisServer::start();
    let registry = Registry::open(&redis.url()).unwrap();
    let ttl = Duration::from_millis(1_500);
    let mut a = registered("A", &redis, 1_500).await;
    let (gateway, gw) = registry_gateway(&redis).await;
    wait_serving(&gw, &["A"], PATIENCE).await;

    let killed = Instant::now();
    a.signal_and_wait("KILL");
    // A SIGKILLed process withdraws nothing: the entry is still there just after.
    assert!(registry.snapshot().await.unwrap().contains_key("A"));
    while registry.snapshot().await.unwrap().contains_key("A") {
        assert!(
            killed.elapsed() <= ttl + Duration::from_millis(100),
            "still registered {:?} after SIGKILL (TTL {ttl:?})",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = killed.elapsed();
    eprintln!("SIGKILLed instance gone from the registry after {gone:?} (TTL {ttl:?})");
    // The gateway follows: its next re-read drops it.
    wait_listed(&gw, &[], dlb::registry::RESYNC + Duration::from_millis(500)).await;
    gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_id_is_refused_with_a_clear_error_and_a_restart_takes_its_place_back() {
    let redis = RedisServer::start();
    let registry = Registry::open(&redis.url()).unwrap();
    let mut a = registered("A", &redis, 5_000).await;

    let duplicate = Command::new(support::compute_binary())
        .args(["--id", "A", "--listen", "127.0.0.1:0", "--register"])
        .args(["--redis", &redis.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = duplicate.id().to_string();
    let waited = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || duplicate.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("the duplicate instance did not exit within 15 s");
    };
    let output = output.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "instance id \"A\" is already registered by {}",
            a.addr
        )) && stderr.contains("give each instance its own --id"),
        "{stderr}"
    );
    // The first one keeps its registration.
    assert_eq!(registry.snapshot().await.unwrap()["A"].address, a.addr);

    // Killed and restarted on its address at once (long before its TTL): it takes its own
    // place back, as a new process.
    let before = registry.snapshot().await.unwrap()["A"].token.clone();
    a.signal_and_wait("KILL");
    a.restart();
    // It registers just after it starts listening.
    let after = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let entry = registry.snapshot().await.unwrap()["A"].clone();
            if entry.token != before {
                return entry;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the restarted instance registers within 2 s, long before the TTL");
    assert_eq!(after.address, a.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_keep_serving_while_redis_is_away_and_resync_when_it_returns() {
    let mut redis = RedisServer::start();
    let _a = registered("A", &redis, 1_200).await;
    let (gateway, gw) = registry_gateway(&redis).await;
    wait_serving(&gw, &["A"], PATIENCE).await;

    // Redis gone: the last membership stands, calls go on.
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(served_by(&gw, 5).await, BTreeMap::from([("A".into(), 5)]));

    // Back, empty (no persistence): A registers again by its heartbeat, B is new; the
    // gateway reads the registry again after reconnecting and sees both.
    redis.restart();
    let _b = registered("B", &redis, 1_200).await;
    wait_serving(&gw, &["A", "B"], Duration::from_secs(5)).await;
    assert_eq!(
        served_by(&gw, 10).await,
        BTreeMap::from([("A".into(), 5), ("B".into(), 5)])
    );
    gateway.shutdown().await.unwrap();
}

/// A private `dnsmasq` answering from a hosts file on 127.0.0.1, stopped on drop.
struct Dnsmasq {
    child: std::process::Child,
    hosts: std::path::PathBuf,
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
}

impl Dnsmasq {
    fn start(records: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dlb-dnsmasq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, records).unwrap();
        for _ in 0..5 {
            // A port free for UDP and TCP both (dnsmasq binds both; released at once, retried
            // if somebody takes it meanwhile).
            let port = loop {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let port = udp.local_addr().unwrap().port();
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    break port;
                }
            };
            let child = Command::new(dlb::testing::system_tool("dnsmasq"))
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--local=/dlb.test/",
                ])
                .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .arg(format!("--pid-file={}", dir.join("pid").display()))
                .args(["--local-ttl=0", "--user=root", "--log-facility=-"])
                .stdout(Stdio::null())
                // What it says when it cannot start, for the panic below.
                .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run dnsmasq ({e}); install it: apt-get install -y dnsmasq-base")
                });
            let mut server = Self {
                child,
                hosts: hosts.clone(),
                dir: dir.clone(),
                addr: ([127, 0, 0, 1], port).into(),
            };
            let ready = Instant::now();
            while ready.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(server.addr).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        let said = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        panic!("dnsmasq did not start in 5 tries; it said: {said}");
    }

    /// Replaces the records and makes dnsmasq read them again.
    fn set_records(&self, records: &str) {
        std::fs::write(&self.hosts, records).unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_picks_up_added_and_removed_records() {
    // Three instances on one port, on three loopback addresses, as pods behind a headless
    // service would be.
    let first = ComputeProcess::start_with(&[], "X", "127.0.0.1:0", &["--redis", "none"]);
    let port = first.addr.rsplit_once(':').unwrap().1.to_owned();
    let second =
        ComputeProcess::start_with(&[], "Y", &format!("127.0.0.2:{port}"), &["--redis", "none"]);
    let third =
        ComputeProcess::start_with(&[], "Z", &format!("127.0.0.3:{port}"), &["--redis", "none"]);
    let name = "compute.dlb.test";
    let dns = Dnsmasq::start(&format!("127.0.0.1 {name}\n127.0.0.2 {name}\n"));

    let mut config = Config::for_tests(vec![]);
    config.discover = Some(format!("dns:{name}:{port}").parse().unwrap());
    config.dns_server = Some(dns.addr);
    config.dns_interval_ms = 200;
    let gateway = RunningGateway::start(config, vec![], false).await.unwrap();
    let gw = channel(&gateway.uri()).await;
    let id = |ip: &str| format!("{ip}-{port}");
    let (one, two, three) = (id("127.0.0.1"), id("127.0.0.2"), id("127.0.0.3"));
    wait_serving(&gw, &[&one, &two], PATIENCE).await;
    assert_eq!(
        served_by(&gw, 6).await,
        BTreeMap::from([(one.clone(), 3), (two.clone(), 3)])
    );

    // A record added: the new instance is in rotation after the next resolution.
    dns.set_records(&format!(
        "127.0.0.1 {name}\n127.0.0.2 {name}\n127.0.0.3 {name}\n"
    ));
    wait_serving(&gw, &[&one, &two, &three], Duration::from_secs(3)).await;
    assert_eq!(
        served_by(&gw, 9).await,
        BTreeMap::from([(one.clone(), 3), (two.clone(), 3), (three.clone(), 3)])
    );

    // A record removed: that instance leaves (it is still up; DNS alone decides).
    dns.set_records(&format!("127.0.0.1 {name}\n127.0.0.3 {name}\n"));
    wait_listed(&gw, &[&one, &three], Duration::from_secs(3)).await;
    assert_eq!(
        served_by(&gw, 4).await,
        BTreeMap::from([(one.clone(), 2), (three.clone(), 2)])
    );

    // The DNS server gone: the last membership stands.
    drop(dns);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        served_by(&gw, 4).await,
        BTreeMap::from([(one, 2), (three, 2)])
    );
    gateway.shutdown().await.unwrap();
    drop((first, second, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_registers_the_instances_it_supervises() {
    let redis = RedisServer::start();
    let (gateway, gw) = registry_gateway(&redis).await;
    // A real dlb-control process (it spawns the dlb-compute next to it).
    support::compute_binary();
    let control = Command::new(dlb::testing::workspace_binary("dlb-control"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--first-port",
            "0",
            "--instances",
            "2",
        ])
        .args(["--register", "--id-prefix", "h7-", "--redis", &redis.url()])
        // Not handed down: two instances on one health port could not both start.
        .env(
            "DLB_COMPUTE_HEALTH_LISTEN",
            format!("127.0.0.1:{}", dlb::testing::free_port()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed (with its instances, which exit with their parent) if the test fails midway.
    let mut control = dlb::testing::KillOnDrop(control);
    let control = &mut control.0;
    wait_serving(&gw, &["h7-A", "h7-B"], PATIENCE).await;
    assert_eq!(
        served_by(&gw, 4).await,
        BTreeMap::from([("h7-A".into(), 2), ("h7-B".into(), 2)])
    );

    // Control drains its instances on SIGTERM; each withdraws from the registry first.
    let status = Command::new("kill")
        .args(["-TERM", &control.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(control.wait().unwrap().success());
    assert!(
        Registry::open(&redis.url())
            .unwrap()
            .snapshot()
            .await
            .unwrap()
            .is_empty()
    );
    wait_listed(&gw, &[], Duration::from_secs(2)).await;
    gateway.shutdown().await.unwrap();
}
