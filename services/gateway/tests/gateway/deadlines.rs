//! Slow calls and deadlines: a slow Fibonacci never delays cheap calls; an expired call stops its work.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fibonacci_does_not_delay_cheap_calls() {
    let ids = ["A", "B", "C"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;

    let mut client = OperationsClient::new(gw.clone()).max_decoding_message_size(64 << 20);
    let slow = tokio::spawn(async move {
        client
            .fibonacci(FibonacciRequest { n: 10_000_000 })
            .await
            .map(|r| r.into_inner().digits)
    });
    // Wait until it computes somewhere.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut busy = 0;
            for c in &computes {
                busy += LoadClient::new(channel(&c.uri()).await)
                    .get_load(GetLoadRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .busy_workers;
            }
            if busy > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    for _ in 0..30 {
        assert_eq!(reverse(&gw, "abc").await.unwrap().into_inner().text, "cba");
    }
    assert!(
        !slow.is_finished(),
        "30 cheap calls were answered while F(10^7) computed"
    );
    assert_eq!(slow.await.unwrap().unwrap(), 2_089_877);
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_is_exceeded_and_the_instance_stops_the_work() {
    let ids = ["A"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;

    let mut request = tonic::Request::new(FibonacciRequest { n: 10_000_000 });
    request.set_timeout(Duration::from_millis(150));
    let status = OperationsClient::new(gw.clone())
        .fibonacci(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline"),
        "{}",
        status.message()
    );

    let mut load = LoadClient::new(channel(&computes[0].uri()).await);
    tokio::time::timeout(PATIENCE, async {
        loop {
            let report = load.get_load(GetLoadRequest {}).await.unwrap().into_inner();
            if report.cancelled == 1 && report.busy_workers == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the instance abandons the computation");
    // The abandoned call is no longer counted in flight at the gateway either.
    tokio::time::timeout(PATIENCE, async {
        while stats(&gw).await.instances.iter().any(|i| i.in_flight > 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("in-flight count back to zero");
    stop(gateway, computes).await;
}

/// A caller that goes before its answer (no deadline: it cancels) is still counted, as a
/// CANCELLED call, in the gateway's totals and by method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_before_its_answer_is_still_counted() {
    let ids = ["A"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;
    let mut client = OperationsClient::new(gw.clone());
    let slow =
        tokio::spawn(async move { client.fibonacci(FibonacciRequest { n: 10_000_000 }).await });
    dlb_compute::testing::wait_busy(&channel(&computes[0].uri()).await).await;
    // Dropping the call resets its stream: the gateway's relay is dropped unanswered.
    slow.abort();
    let totals = dlb::testing::eventually("the cancelled call counted", || {
        let gw = gw.clone();
        async move {
            let s = stats(&gw).await;
            let by_method = s
                .methods
                .iter()
                .any(|m| m.method == "/dlb.v1.Operations/Fibonacci");
            (s.requests == 1 && by_method).then_some(s)
        }
    })
    .await;
    assert_eq!(totals.failures, 1, "{totals:?}");
    let fibonacci = totals
        .methods
        .iter()
        .find(|m| m.method == "/dlb.v1.Operations/Fibonacci")
        .expect("Fibonacci counted by method");
    assert_eq!(
        (fibonacci.calls, fibonacci.failures),
        (1, 1),
        "{fibonacci:?}"
    );
    stop(gateway, computes).await;
}
