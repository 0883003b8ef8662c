//! The compute service over real gRPC on 127.0.0.1 port 0: results, metadata, bad input,
//! limits, overload, cancellation, and heavy work not blocking cheap calls or health.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dlb::proto::v1::{
    Certainty, FibonacciRequest, GetLoadRequest, IsPalindromeRequest, IsPrimeRequest,
    ReverseRequest, WordCountRequest, load_client::LoadClient, operations_client::OperationsClient,
};
use dlb_compute::Config;
use dlb_compute::testing::RunningCompute;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use dlb::testing::PATIENCE;

async fn start(config: Config) -> (RunningCompute, Channel) {
    let compute = dlb_compute::testing::start(config).await.unwrap();
    let channel = dlb::testing::channel(&compute.uri()).await;
    (compute, channel)
}

fn ops(channel: &Channel) -> OperationsClient<Channel> {
    OperationsClient::new(channel.clone()).max_decoding_message_size(64 << 20)
}

async fn reverse_works(channel: &Channel) {
    let reply = ops(channel)
        .reverse(ReverseRequest {
            text: "still serving".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().text, "gnivres llits");
}

#[tokio::test]
async fn every_operation_answers_with_served_by() {
    let (compute, channel) = start(Config::for_tests("B")).await;
    let mut client = ops(&channel);

    let reply = client
        .is_prime(IsPrimeRequest {
            number: "18446744073709551557".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.metadata().get("x-served-by").unwrap(), "B");
    let body = reply.into_inner();
    assert!(body.prime);
    assert_eq!(body.certainty(), Certainty::Proven);

    let body = client
        .is_prime(IsPrimeRequest {
            number: "618970019642690137449562111".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(body.prime);
    assert_eq!(body.certainty(), Certainty::Probable);

    let reply = client
        .is_palindrome(IsPalindromeRequest {
            text: "A man, a plan, a canal: Panama".into(),
            normalize: true,
        })
        .await
        .unwrap();
    assert_eq!(reply.metadata().get("x-served-by").unwrap(), "B");
    assert!(reply.into_inner().palindrome);

    let reply = client
        .reverse(ReverseRequest {
            text: "e\u{301}a".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().text, "ae\u{301}");

    let body = client
        .fibonacci(FibonacciRequest { n: 94 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(body.value, "19740274219868223167");
    assert_eq!(body.digits, 20);

    let body = client
        .word_count(WordCountRequest {
            text: "c, d-e\nThe the".into(),
            top: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (body.words, body.lines, body.characters, body.bytes),
        (4, 1, 14, 14)
    );
    assert_eq!(body.top[0].word, "the");
    assert_eq!(body.top[0].count, 2);

    // Heavy inputs take the CPU pool and give the same kind of answers.
    let big = "ab".repeat(100_000);
    let reply = client
        .reverse(ReverseRequest { text: big.clone() })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().text, "ba".repeat(100_000));
    let body = client
        .fibonacci(FibonacciRequest { n: 1_000_000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(body.digits, 208_988);
    assert!(body.value.starts_with("19532821287077577316"));

    compute.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_numbers_get_invalid_argument_naming_the_field() {
    let mut config = Config::for_tests("A");
    config.max_prime_digits = 50;
    let (compute, channel) = start(config).await;
    let mut client = ops(&channel);
    let over_limit = "1".repeat(51);
    for bad in [
        "",
        "abc",
        "-7",
        "7.5",
        " 12 ",
        "1_0",
        "\u{663}",
        over_limit.as_str(),
    ] {
        let status = client
            .is_prime(IsPrimeRequest { number: bad.into() })
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(
            status.message().starts_with("number "),
            "{bad:?}: {}",
            status.message()
        );
        assert_eq!(status.metadata().get("x-served-by").unwrap(), "A");
    }
    let status = client
        .is_prime(IsPrimeRequest { number: over_limit })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("51 digits") && status.message().contains("limit of 50"),
        "{}",
        status.message()
    );
    // Leading zeros do not count against the limit.
    let padded = format!("{}97", "0".repeat(100));
    assert!(
        client
            .is_prime(IsPrimeRequest { number: padded })
            .await
            .unwrap()
            .into_inner()
            .prime
    );
    reverse_works(&channel).await;
    compute.shutdown().await.unwrap();
}

#[tokio::test]
async fn limits_on_n_top_and_message_size_are_enforced() {
    let mut config = Config::for_tests("A");
    config.max_fib_n = 5_000;
    config.max_message_bytes = 64 * 1024;
    let (compute, channel) = start(config).await;
    let mut client = ops(&channel);

    let status = client
        .fibonacci(FibonacciRequest { n: 5_001 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("n = 5001") && status.message().contains("maximum of 5000"),
        "{}",
        status.message()
    );
    assert_eq!(
        client
            .fibonacci(FibonacciRequest { n: 5_000 })
            .await
            .unwrap()
            .into_inner()
            .digits,
        1045
    );

    let status = client
        .word_count(WordCountRequest {
            text: "a".into(),
            top: 1_001,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("top = 1001"),
        "{}",
        status.message()
    );

    let status = client
        .reverse(ReverseRequest {
            text: "x".repeat(65 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("66564 bytes") && status.message().contains("limit of 65536"),
        "{}",
        status.message()
    );

    reverse_works(&channel).await;
    compute.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_fibonacci_does_not_delay_health_or_cheap_calls() {
    let (compute, channel) = start(Config::for_tests("A")).await;
    let max_n = Config::for_tests("A").max_fib_n;
    let mut heavy_client = ops(&channel);
    let heavy = tokio::spawn(async move {
        heavy_client
            .fibonacci(FibonacciRequest { n: max_n })
            .await
            .map(|r| r.into_inner().digits)
    });
    dlb_compute::testing::wait_busy(&channel).await;

    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    reverse_works(&channel).await;
    assert!(
        !heavy.is_finished(),
        "health and a cheap call must be answered while F({max_n}) is still computing"
    );
    let digits = tokio::time::timeout(PATIENCE, heavy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(digits, 2_089_877);
    compute.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cpu_pool_answers_resource_exhausted_and_recovers() {
    let mut config = Config::for_tests("A");
    config.workers = Some(1);
    config.queue = 0;
    let (compute, channel) = start(config).await;
    let mut heavy_client = ops(&channel);
    let heavy = tokio::spawn(async move {
        heavy_client
            .fibonacci(FibonacciRequest { n: 10_000_000 })
            .await
    });
    dlb_compute::testing::wait_busy(&channel).await;
    let status = ops(&channel)
        .fibonacci(FibonacciRequest { n: 100_000 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("overloaded"),
        "{}",
        status.message()
    );
    // Cheap calls do not need the pool and keep working.
    reverse_works(&channel).await;
    assert!(heavy.await.unwrap().is_ok());
    let after = ops(&channel)
        .fibonacci(FibonacciRequest { n: 100_000 })
        .await
        .unwrap();
    assert_eq!(after.into_inner().digits, 20_899);
    assert_eq!(
        LoadClient::new(channel.clone())
            .get_load(GetLoadRequest {})
            .await
            .unwrap()
            .into_inner()
            .rejected,
        1
    );
    compute.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_stops_the_work() {
    let mut config = Config::for_tests("A");
    config.workers = Some(1);
    let (compute, channel) = start(config).await;
    let mut request = tonic::Request::new(FibonacciRequest { n: 10_000_000 });
    request.set_timeout(Duration::from_millis(100));
    let status = ops(&channel).fibonacci(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.metadata().get("x-served-by").unwrap(), "A");
    // The computation notices and stops, rather than running to the end.
    let mut load = LoadClient::new(channel.clone());
    let report = tokio::time::timeout(PATIENCE, async {
        loop {
            let report = load.get_load(GetLoadRequest {}).await.unwrap().into_inner();
            if report.cancelled == 1 && report.busy_workers == 0 && report.in_flight == 0 {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(report.cancelled, 1);
    reverse_works(&channel).await;
    compute.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_v1_are_served() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let (compute, channel) = start(Config::for_tests("A")).await;
    for service in ["", "dlb.v1.Operations"] {
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            reply.into_inner().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["dlb.v1.Operations", "dlb.v1.Load", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    compute.shutdown().await.unwrap();
}
