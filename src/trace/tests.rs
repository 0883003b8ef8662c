use std::sync::Arc;
use std::time::Duration;

use super::*;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

fn on(endpoint: &str) -> TraceArgs {
    TraceArgs {
        otlp_endpoint: Some(endpoint.to_owned()),
    }
}

#[test]
fn traceparent_round_trips_and_bad_ones_are_refused() {
    let parent = SpanContext::parse(PARENT).expect("valid");
    assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&parent.span_id), "00f067aa0ba902b7");
    assert!(parent.sampled);
    assert_eq!(parent.to_traceparent(), PARENT);
    let unsampled = SpanContext::parse(&PARENT.replace("-01", "-00")).expect("valid");
    assert!(!unsampled.sampled);
    // A later version may add fields after the flags.
    assert!(SpanContext::parse(&format!("{}-what", PARENT.replacen("00", "01", 1))).is_some());
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "<script>alert(1)</script>-----------------------------------",
    ] {
        assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn a_child_keeps_the_trace_and_the_sampled_flag_and_gets_a_new_span_id() {
    let (tracer, queue) = recording(Sampler::default());
    let parent = SpanContext::parse(PARENT).expect("valid");
    let child = tracer.start("a", Kind::Server, Some(&parent), Some("k=v"));
    assert_eq!(child.context().trace_id, parent.trace_id);
    assert_ne!(child.context().span_id, parent.span_id);
    assert!(child.is_recording());
    child.end();
    let spans = queue.take().0;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent, Some(parent.span_id));
    assert_eq!(spans[0].trace_state.as_deref(), Some("k=v"));
    assert!(spans[0].end_unix_nanos >= spans[0].start_unix_nanos);

    // Parent-based: the caller's "not sampled" is kept, and nothing is recorded.
    let unsampled = SpanContext::parse(&PARENT.replace("-01", "-00")).expect("valid");
    let child = tracer.start("b", Kind::Server, Some(&unsampled), None);
    assert!(!child.context().sampled && !child.is_recording());
    assert_eq!(child.context().trace_id, unsampled.trace_id);
    child.end();
    assert!(queue.take().0.is_empty());

    // A root gets a fresh trace id, different every time.
    let a = tracer.start("c", Kind::Client, None, None);
    let b = tracer.start("c", Kind::Client, None, None);
    assert_ne!(a.context().trace_id, b.context().trace_id);
    assert_ne!(a.context().trace_id, [0; 16]);
}

#[test]
fn an_off_tracer_records_nothing_but_still_gives_ids() {
    let tracer = Tracer::default();
    let span = tracer.start("x", Kind::Server, None, None);
    assert!(!span.is_recording());
    assert!(!span.context().sampled);
    assert!(SpanContext::parse(&span.context().to_traceparent()).is_some());
}

#[test]
fn the_ratio_sampler_keeps_about_its_share_and_decides_a_trace_alike_everywhere() {
    let sampler = Sampler::Ratio(0.01);
    let kept = (0..100_000)
        .filter(|_| sampler.sample(None, &new_trace_id()))
        .count();
    assert!((700..1300).contains(&kept), "kept {kept} of 100000 at 1%");
    let id = new_trace_id();
    let first = sampler.sample(None, &id);
    assert!((0..100).all(|_| sampler.sample(None, &id) == first));
    assert!((0..1000).all(|_| !Sampler::Ratio(0.0).sample(None, &new_trace_id())));
    assert!((0..1000).all(|_| Sampler::Ratio(1.0).sample(None, &new_trace_id())));
    // Parent-based ratio follows a parent, and samples only new traces by ratio.
    let parent = SpanContext::parse(PARENT).expect("valid");
    let based = Sampler::ParentBased(settings::Root::Ratio(0.0));
    assert!(based.sample(Some(&parent), &parent.trace_id));
    assert!(!based.sample(None, &new_trace_id()));
}

#[test]
fn samplers_come_from_the_standard_variables_and_bad_ones_are_refused() {
    assert_eq!(Sampler::from_env(None, None), Ok(Sampler::default()));
    assert_eq!(
        Sampler::from_env(Some("parentbased_traceidratio"), Some("0.01")),
        Ok(Sampler::ParentBased(settings::Root::Ratio(0.01)))
    );
    assert_eq!(
        Sampler::from_env(Some("traceidratio"), None),
        Ok(Sampler::Ratio(1.0))
    );
    assert_eq!(
        Sampler::from_env(Some("always_off"), None),
        Ok(Sampler::AlwaysOff)
    );
    let error = Sampler::from_env(Some("traceidratio"), Some("1.5")).expect_err("over 1");
    assert!(error.contains("OTEL_TRACES_SAMPLER_ARG=\"1.5\""), "{error}");
    let error = Sampler::from_env(Some("sometimes"), None).expect_err("unknown");
    assert!(error.contains("\"sometimes\"") && error.contains("parentbased_traceidratio"));
}

#[test]
fn settings_follow_the_flag_and_the_otel_variables() {
    let none = Settings::from_env(&TraceArgs::default(), "dlb-gateway", "g", env(&[]));
    assert_eq!(none, Ok(None));
    let settings = Settings::from_env(
        &on("127.0.0.1:4317"),
        "dlb-gateway",
        "g1",
        env(&[
            ("OTEL_SERVICE_NAME", "edge"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=dev,team=a%20b",
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20x"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]),
    )
    .expect("valid")
    .expect("on");
    assert_eq!(settings.endpoint, "http://127.0.0.1:4317");
    assert_eq!(settings.service_name, "edge");
    assert!(
        settings
            .resource
            .contains(&("service.instance.id".into(), "g1".into()))
    );
    assert!(settings.resource.contains(&("team".into(), "a b".into())));
    assert_eq!(
        settings.headers,
        vec![("authorization".to_owned(), "Bearer x".to_owned())]
    );
    assert_eq!(settings.schedule_delay, Duration::from_millis(100));
    assert_eq!(
        settings.sampler,
        Sampler::ParentBased(settings::Root::Ratio(0.25))
    );

    // The traces' own endpoint wins over the general one (which clap puts in the flag).
    let traces = Settings::from_env(
        &on("http://general:4317"),
        "s",
        "i",
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]),
    );
    assert_eq!(
        traces.expect("valid").expect("on").endpoint,
        "http://traces:4317"
    );
    // Turned off by the standard switches.
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ] {
        assert_eq!(
            Settings::from_env(&on("http://c:4317"), "s", "i", env(&[off])),
            Ok(None)
        );
    }
}

#[test]
fn settings_dlb_cannot_honour_stop_the_start_with_the_variable_named() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("ftp://c:4317", &[], "use http://HOST:PORT"),
        // A bare address needs its port (a name alone is no URL).
        ("collector", &[], "give HOST:PORT"),
        ("collector:0", &[], "give HOST:PORT"),
        ("collector:http", &[], "give HOST:PORT"),
        ("http://c:4318/v1/traces", &[], "no path"),
        (
            "http://c:4317",
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
            "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/protobuf\"",
        ),
        (
            "http://c:4317",
            &[("OTEL_TRACES_EXPORTER", "zipkin")],
            "OTEL_TRACES_EXPORTER=\"zipkin\"",
        ),
        (
            "http://c:4317",
            &[("OTEL_BSP_SCHEDULE_DELAY", "soon")],
            "OTEL_BSP_SCHEDULE_DELAY=\"soon\"",
        ),
        (
            "http://c:4317",
            &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
            "\"novalue\" is not key=value",
        ),
        ("https://c:4317", &[], "OTEL_EXPORTER_OTLP_CERTIFICATE"),
    ];
    for (endpoint, vars, expected) in cases {
        let error = Settings::from_env(&on(endpoint), "s", "i", env(vars))
            .expect_err(&format!("{endpoint} {vars:?}"));
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
    }
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let queue = Arc::new(export::Queue::new(3, 2));
    let tracer = Tracer::recording(Arc::clone(&queue), Sampler::AlwaysOn);
    for _ in 0..5 {
        tracer.start("x", Kind::Internal, None, None).end();
    }
    let (batch, left) = queue.take();
    assert_eq!((batch.len(), left), (2, 1));
    assert_eq!(queue.dropped(), 2);
}

#[test]
fn grpc_statuses_fail_a_span_as_the_rpc_conventions_say() {
    let (tracer, queue) = recording(Sampler::AlwaysOn);
    let mut server = tracer.start("s", Kind::Server, None, None);
    server.set_grpc_status(tonic::Code::InvalidArgument, "bad n");
    server.end();
    let mut server = tracer.start("s", Kind::Server, None, None);
    server.set_grpc_status(tonic::Code::Unavailable, "draining");
    server.end();
    let mut client = tracer.start("c", Kind::Client, None, None);
    client.set_grpc_status(tonic::Code::InvalidArgument, "bad n");
    client.end();
    let spans = queue.take().0;
    assert_eq!(spans[0].error, None);
    assert_eq!(spans[1].error.as_deref(), Some("UNAVAILABLE: draining"));
    assert_eq!(spans[2].error.as_deref(), Some("INVALID_ARGUMENT: bad n"));
    assert!(
        spans[0]
            .attributes
            .contains(&("rpc.grpc.status_code", Value::Int(3)))
    );
}

fn recording(sampler: Sampler) -> (Tracer, Arc<export::Queue>) {
    let queue = Arc::new(export::Queue::new(100, 100));
    (Tracer::recording(Arc::clone(&queue), sampler), queue)
}

#[tokio::test]
async fn spans_reach_an_otlp_receiver_with_resource_and_attributes_and_the_end_flushes() {
    let receiver = Receiver::start(true).await.expect("receiver");
    let settings = Settings::from_env(
        &on(&receiver.url()),
        "dlb-test",
        "t1",
        env(&[("OTEL_BSP_SCHEDULE_DELAY", "600000")]),
    )
    .expect("valid")
    .expect("on");
    let exporting = Exporting::start(settings).expect("start");
    let tracer = exporting.tracer();
    let parent = SpanContext::parse(PARENT).expect("valid");
    let mut span = tracer.start(
        "dlb.v1.Operations/Reverse",
        Kind::Server,
        Some(&parent),
        None,
    );
    set_rpc_attributes(&mut span, "/dlb.v1.Operations/Reverse");
    span.set("dlb.instance", "A");
    span.end();
    // The schedule delay is 10 minutes: only the end's flush can send it.
    assert_eq!(exporting.finish().await, (1, 0));
    let received = receiver.spans();
    assert_eq!(received.len(), 1);
    let attribute = |attributes: &[proto::KeyValue], key: &str| {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    };
    let (service, span) = &received[0];
    assert_eq!(service, "dlb-test");
    assert_eq!(span.trace_id, parent.trace_id.to_vec());
    assert_eq!(span.parent_span_id, parent.span_id.to_vec());
    assert_eq!(span.name, "dlb.v1.Operations/Reverse");
    assert_eq!(span.kind, i32::from(proto::span::SpanKind::Server));
    assert_eq!(
        attribute(&span.attributes, "rpc.method"),
        Some(proto::any_value::Value::StringValue("Reverse".into()))
    );
    assert_eq!(
        attribute(&span.attributes, "dlb.instance"),
        Some(proto::any_value::Value::StringValue("A".into()))
    );
}

#[tokio::test]
async fn a_collector_away_costs_dropped_spans_not_a_hang() {
    // A port nobody listens on.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let settings = Settings::from_env(
        &on(&format!("http://{addr}")),
        "dlb-test",
        "t1",
        env(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "500")]),
    )
    .expect("valid")
    .expect("on");
    let exporting = Exporting::start(settings).expect("start");
    let tracer = exporting.tracer();
    for _ in 0..3 {
        tracer.start("x", Kind::Internal, None, None).end();
    }
    let counts = tokio::time::timeout(Duration::from_secs(5), exporting.finish())
        .await
        .expect("finish is bounded");
    assert_eq!(counts, (0, 3));
}
