//! Overload, connection and stream bounds, bad and oversize input, and large messages.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_and_bad_input_are_answered_clearly() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_in_flight = 1;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // An instance's own answer passes through, with who answered and how many tries.
    let status = OperationsClient::new(gw.clone())
        .is_prime(dlb::proto::v1::IsPrimeRequest {
            number: "12a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("number "),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get("x-served-by").unwrap(), "A");
    assert_eq!(status.metadata().get("x-attempts").unwrap(), "1");

    let mut client = OperationsClient::new(gw.clone()).max_decoding_message_size(64 << 20);
    let slow =
        tokio::spawn(async move { client.fibonacci(FibonacciRequest { n: 5_000_000 }).await });
    tokio::time::timeout(PATIENCE, async {
        while stats(&gw).await.in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    let status = reverse(&gw, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-in-flight"),
        "{}",
        status.message()
    );
    assert!(slow.await.unwrap().is_ok());
    assert!(reverse(&gw, "x").await.is_ok());
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_streams_a_connection_may_open_wait_and_are_all_served() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_concurrent_streams = 2;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // The bound is announced in the gateway's HTTP/2 SETTINGS, which precede its answer to
    // a PING.
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    tokio::select! {
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
        pong = ping.ping(h2::Ping::opaque()) => drop(pong.unwrap()),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 2);

    // Four slow calls at once on a new connection: two are served at a time, the others wait
    // in the caller's client, and every one is answered. (Streams opened before the client
    // has the gateway's SETTINGS may go past the bound; the gateway refuses those unserved,
    // with REFUSED_STREAM, and `Op::send` sends them again.)
    let calls = channel(&gateway.uri()).await;
    let running: Vec<_> = (0..4)
        .map(|_| {
            let mut client = OperationsClient::new(calls.clone());
            tokio::spawn(async move {
                Op::Fibonacci { n: 1_000_000 }
                    .send(&mut client, Some(PATIENCE))
                    .await
            })
        })
        .collect();
    let mut most = 0;
    while !running.iter().all(tokio::task::JoinHandle::is_finished) {
        most = most.max(stats(&gw).await.in_flight);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for call in running {
        call.await.unwrap().unwrap();
    }
    assert_eq!(most, 2, "calls served at once over one connection");
    stop(gateway, computes).await;
}

#[tokio::test]
async fn past_its_connection_limit_new_connections_wait_until_one_closes() {
    let mut config = Config::for_tests(vec![]);
    config.max_connections = Some(2);
    let computes = in_process(&["A"]).await;
    let gateway = RunningGateway::start(config, backends(&computes, &["A"]), true)
        .await
        .unwrap();
    // `gw` is the first connection, `second` the last the bound allows.
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &["A"], PATIENCE).await;
    let second = channel(&gateway.uri()).await;
    assert_eq!(
        reverse(&second, "ab").await.unwrap().into_inner().text,
        "ba"
    );

    // A third connection is not accepted: its call waits (in the listen backlog), unanswered.
    let uri = gateway.uri();
    let waiting = tokio::spawn(async move { reverse(&channel(&uri).await, "abc").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a call over a connection past the bound was answered: {:?}",
        waiting.await
    );
    // The connections within the bound are served meanwhile, and /metrics shows them.
    assert_eq!(reverse(&gw, "xy").await.unwrap().into_inner().text, "yx");
    let metrics = http_get(gateway.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("\ndlb_gateway_connections 2\n")
            && metrics.contains("\ndlb_gateway_max_connections 2\n"),
        "{metrics}"
    );

    // Once one closes, the waiting connection is accepted and its call answered.
    drop(second);
    let answered = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiting call was answered once a connection closed")
        .unwrap();
    assert_eq!(answered.unwrap().into_inner().text, "cba");
    stop(gateway, computes).await;
}

#[tokio::test]
async fn a_gateway_out_of_file_descriptors_backs_off_and_serves_again() {
    let computes = in_process(&["A"]).await;
    // The gateway process may open 48 files; its connection bound is far above that.
    let log = std::env::temp_dir().join(format!("dlb-gw-emfile-{}.log", std::process::id()));
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 48 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_dlb-gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "none"])
        .args([
            "--redis",
            "none",
            "--threads",
            "1",
            "--max-connections",
            "1000",
        ])
        .arg("--backend")
        .arg(format!("A={}", computes[0].addr))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dlb::testing::KillOnDrop)
        .unwrap();
    let addr = dlb::testing::listening_addr(&mut child.0);
    let gw = channel(&format!("http://{addr}")).await;
    wait_serving(&gw, &["A"], PATIENCE).await;
    // Its connections to A are opened now, while it has descriptors to spare.
    for _ in 0..8 {
        assert_eq!(reverse(&gw, "ab").await.unwrap().into_inner().text, "ba");
    }

    // More connections than it has descriptors: the rest wait in the listen backlog, and
    // accepting them fails (EMFILE) until some close.
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let said = std::fs::read_to_string(&log).unwrap();
    let retries = said.matches("cannot accept a connection").count();
    // It says so, and tries again every 100 ms rather than at once (an immediate retry fails
    // the same way: a loop taking a whole core, and thousands of these lines).
    assert!(
        (1..=20).contains(&retries),
        "{retries} accept retries in 1.5 s:\n{said}"
    );
    assert_eq!(reverse(&gw, "ab").await.unwrap().into_inner().text, "ba");

    // Once they close, new connections are accepted and served.
    drop(flood);
    let fresh = tokio::time::timeout(PATIENCE, async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(Ok(answer)) = tokio::time::timeout(
                Duration::from_secs(1),
                reverse(&channel(&format!("http://{addr}")).await, "abc"),
            )
            .await
            {
                break answer.into_inner().text;
            }
        }
    })
    .await
    .expect("a new connection was served once the flood closed");
    assert_eq!(fresh, "cba");
    drop(child);
    let _ = std::fs::remove_file(&log);
    for c in computes {
        c.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_shed_and_never_ejects_a_healthy_instance() {
    let _turn = heavy_turn().await;
    // Offered far beyond what the gateway can forward here, so that responses pile up unread
    // on its connections to the instances (h2's small-frame guard once closed them, and every
    // instance was ejected: everything answered UNAVAILABLE).
    let (_computes, gateway, gw) = three_processes_behind_a_gateway().await;

    // Over enough connections that the streams they may open exceed --max-in-flight.
    let mut config = load(&gateway, 1, 40_000);
    config.rate = Some(40_000.0);
    config.connections = 16;
    let report = bench::run(config, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(report.requests, 40_000);
    assert!(
        report
            .errors
            .keys()
            .all(|code| code == "RESOURCE_EXHAUSTED" || code == "DEADLINE_EXCEEDED"),
        "an overload is shed, never failed as UNAVAILABLE: {:?} {:?}",
        report.errors,
        report.error_samples
    );
    assert!(
        report.errors.contains_key("RESOURCE_EXHAUSTED"),
        "the load was meant to go past --max-in-flight: {report:?}"
    );
    for id in ["A", "B", "C"] {
        assert_eq!(state_of(&gw, id).await, "serving", "{id}");
    }
    let counters = stats(&gw).await;
    assert!(
        counters.instances.iter().all(|i| i.errors == 0),
        "{counters:?}"
    );
    gateway.shutdown().await.unwrap();
}

/// One call by hand over HTTP/2 (no gRPC client): its grpc-status and grpc-message, from the
/// headers of a trailers-only answer or from the trailers.
pub(crate) async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> (String, String) {
    use tonic::codegen::http;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    let (head, mut body) = response.await.unwrap().into_parts();
    // grpc-message is percent-encoded.
    let read = |map: &http::HeaderMap, key: &str| {
        let raw = map
            .get(key)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == b'%' && i + 2 < raw.len() {
                let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(raw[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    if head.headers.contains_key("grpc-status") {
        return (
            read(&head.headers, "grpc-status"),
            read(&head.headers, "grpc-message"),
        );
    }
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    (
        read(&trailers, "grpc-status"),
        read(&trailers, "grpc-message"),
    )
}

#[tokio::test]
async fn dlb_clients_send_a_call_again_when_its_stream_was_refused_unprocessed() {
    // R refuses every other call with REFUSED_STREAM (and answers the rest "cba").
    let (refusing, task, _) = resetting_instance(Some(2)).await;
    let mut client = OperationsClient::new(channel(&format!("http://{refusing}")).await);
    let abc = Op::Reverse { text: "abc".into() };
    for _ in 0..3 {
        let (answer, _) = abc.send(&mut client, Some(PATIENCE)).await.unwrap();
        assert_eq!(answer["text"], "cba");
    }
    task.abort();

    // A server that refuses every try: the refusal is reported once the tries are spent.
    let (refusing, task, calls) = resetting_instance(None).await;
    let mut client = OperationsClient::new(channel(&format!("http://{refusing}")).await);
    let status = abc.send(&mut client, Some(PATIENCE)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(dlb::client::refused_unprocessed(&status), "{status:?}");
    assert_eq!(
        calls.load(Ordering::Relaxed),
        dlb::client::REFUSED_STREAM_TRIES as usize
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_requests_get_clear_errors_and_serving_goes_on() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_message_bytes = 1024;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // Over --max-message-bytes: refused by the gateway, which names the sizes and the flag.
    let status = reverse(&gw, &"x".repeat(2000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("is 2003 bytes, over the limit of 1024 bytes (--max-message-bytes)"),
        "{}",
        status.message()
    );

    // No such method.
    let (code, message) = raw_call(gateway.addr, "/dlb.v1.Operations/Nope", vec![0; 5]).await;
    assert_eq!(code, "12", "{message}");
    assert!(message.contains("Nope"), "{message}");

    // Not a gRPC message: too short, or shorter than its prefix announces.
    let (code, message) = raw_call(gateway.addr, "/dlb.v1.Operations/Reverse", vec![0; 3]).await;
    assert_eq!(code, "13", "{message}");
    assert!(message.contains("carries no gRPC message"), "{message}");
    let (code, message) = raw_call(
        gateway.addr,
        "/dlb.v1.Operations/Reverse",
        vec![0, 0, 0, 0, 10, 0x0a, 1, b'x'],
    )
    .await;
    assert_eq!(code, "13", "{message}");
    assert!(
        message.contains("10 bytes announced, 3 received"),
        "{message}"
    );

    // A well-formed call by hand is relayed byte for byte: Reverse("ab") is "ba".
    let (code, message) = raw_call(
        gateway.addr,
        "/dlb.v1.Operations/Reverse",
        vec![0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b'],
    )
    .await;
    assert_eq!(code, "0", "{message}");

    // Still serving, and none of that counted against the instance.
    assert_eq!(reverse(&gw, "abc").await.unwrap().into_inner().text, "cba");
    let counters = stats(&gw).await;
    assert!(
        counters.instances.iter().all(|i| i.errors == 0),
        "{counters:?}"
    );
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_crosses_the_gateway_intact() {
    // 3 MiB each way: many HTTP/2 frames, forwarded in the pieces they arrived in.
    let ids = ["A"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;
    let text: String = (0..3 * 1024 * 1024 / 8)
        .map(|i| format!("{:07}é", i % 9_999_999))
        .collect::<String>();
    let expected: String = text.chars().rev().collect();
    let response = reverse(&gw, &text).await.unwrap();
    assert_eq!(response.metadata().get("x-served-by").unwrap(), "A");
    assert!(
        response.into_inner().text == expected,
        "the reversed text differs"
    );
    stop(gateway, computes).await;
}
