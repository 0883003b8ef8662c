//! The event log under load when Redis goes away and comes back.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_during_load_fails_no_call_and_logging_resumes() {
    let _turn = heavy_turn().await;
    let mut redis = RedisServer::start();
    let ids = ["A", "B", "C"];
    let computes = in_process(&ids).await;
    let mut config = Config::for_tests(vec![]);
    config.events = EventLogArgs {
        redis: redis.url(),
        ..EventLogArgs::disabled()
    };
    let gateway = RunningGateway::start(config, backends(&computes, &ids), false)
        .await
        .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &ids, PATIENCE).await;

    let progress = Arc::new(Progress::default());
    let run = tokio::spawn(bench::run(load(&gateway, 16, 3_000), Arc::clone(&progress)));
    tokio::time::timeout(PATIENCE, async {
        while progress.completed.load(Ordering::Relaxed) < 500 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    redis.stop();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.ok, 3_000, "{:?}", report.errors);

    redis.restart();
    let reader = dlb::events::reader::EventReader::new(&redis.url()).unwrap();
    reverse(&gw, "after").await.unwrap();
    let events = tokio::time::timeout(PATIENCE, async {
        loop {
            let events = reader.recent(50).await.unwrap_or_default();
            if events.iter().any(|e| {
                e.request
                    .as_ref()
                    .is_some_and(|r| r.input == "after" && r.op == "Reverse" && r.status == "OK")
            }) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("request events reach Redis again");
    let after = events
        .iter()
        .find(|e| e.request.as_ref().is_some_and(|r| r.input == "after"))
        .unwrap();
    assert_eq!(after.service, "gateway");
    let request = after.request.as_ref().unwrap();
    assert!(ids.contains(&request.backend.as_str()));
    assert_eq!(request.attempts, 1);
    stop(gateway, computes).await;
}
