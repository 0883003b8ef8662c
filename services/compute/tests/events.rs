//! A compute instance and the Redis event log: it serves without Redis, logs its lifecycle
//! once Redis appears, and keeps serving through an outage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dlb::events::EventLogArgs;
use dlb::events::reader::EventReader;
use dlb::proto::v1::{ReverseRequest, operations_client::OperationsClient};
use dlb::testing::{RedisServer, free_port};
use dlb_compute::Config;
use tonic::transport::Channel;

use dlb::testing::PATIENCE;

async fn reverse(channel: &Channel, text: &str) -> String {
    OperationsClient::new(channel.clone())
        .reverse(ReverseRequest { text: text.into() })
        .await
        .unwrap()
        .into_inner()
        .text
}

async fn messages(reader: &EventReader) -> Vec<String> {
    reader
        .recent(50)
        .await
        .map(|events| events.into_iter().map(|e| e.message).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_serves_without_redis_and_logs_once_it_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut config = Config::for_tests("R");
    config.events = EventLogArgs {
        redis: url.clone(),
        ..EventLogArgs::disabled()
    };
    let compute = dlb_compute::testing::start(config).await.unwrap();
    let channel = dlb::testing::channel(&compute.uri()).await;
    assert_eq!(reverse(&channel, "no redis yet").await, "tey sider on");

    let mut redis = RedisServer::start_on(port);
    let reader = EventReader::new(&url).unwrap();
    tokio::time::timeout(PATIENCE, async {
        while !messages(&reader).await.contains(&"started".to_owned()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the queued `started` event reaches Redis");
    let started = reader.recent(1).await.unwrap().remove(0);
    assert_eq!(started.service, "compute");
    assert_eq!(started.instance, "R");
    assert_eq!(started.fields["addr"], compute.addr.to_string());

    // Redis goes away: calls keep being answered.
    redis.stop();
    for _ in 0..20 {
        assert_eq!(reverse(&channel, "abc").await, "cba");
    }
    redis.restart();

    // Draining and stopping are logged (the writer flushes once more before the instance ends).
    compute.shutdown().await.unwrap();
    let logged = messages(&reader).await;
    assert!(logged.contains(&"draining".to_owned()), "{logged:?}");
    assert!(logged.contains(&"stopped".to_owned()), "{logged:?}");
}
