use super::policy::matches;
use super::*;

fn certificate(uris: &[&str], dns: &[&str]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
            .unwrap();
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
    }
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn the_identity_is_read_from_the_spiffe_uri_among_the_alternative_names() {
    let der = certificate(
        &["https://example.com/x", "spiffe://dlb.local/gateway"],
        &["localhost", "127.0.0.1"],
    );
    assert_eq!(
        uri_sans(&der),
        ["https://example.com/x", "spiffe://dlb.local/gateway"]
    );
    assert_eq!(
        Caller::of_certificate(&der),
        Caller::Spiffe("spiffe://dlb.local/gateway".into())
    );
    // Without one, or from bytes that are no certificate: no identity.
    assert_eq!(
        Caller::of_certificate(&certificate(&[], &["localhost"])),
        Caller::Anonymous
    );
    for garbage in [
        &b""[..],
        b"\x30",
        b"\x30\x84\xff\xff\xff\xff",
        &der[..der.len() / 2],
    ] {
        assert_eq!(Caller::of_certificate(garbage), Caller::Anonymous);
    }
}

#[test]
fn issuer_and_subject_are_the_encoded_names() {
    let der = certificate(&[], &["localhost"]);
    // Self-signed: the same name twice, a DER sequence naming rcgen's default subject.
    let subject = subject(&der).unwrap();
    assert_eq!(issuer(&der).unwrap(), subject);
    assert_eq!(subject[0], 0x30);
    assert!(String::from_utf8_lossy(subject).contains("rcgen self signed cert"));
}

#[test]
fn patterns_match_with_stars() {
    assert!(matches("*", "/dlb.v1.Control/StopInstance"));
    assert!(matches("/dlb.v1.Control/*", "/dlb.v1.Control/StopInstance"));
    assert!(matches("/dlb.v1.*/Stop*", "/dlb.v1.Control/StopInstance"));
    assert!(matches(
        "/dlb.v1.Control/StopInstance",
        "/dlb.v1.Control/StopInstance"
    ));
    assert!(!matches(
        "/dlb.v1.Control/Stop",
        "/dlb.v1.Control/StopInstance"
    ));
    assert!(!matches("/dlb.v1.Control/*", "/dlb.v1.Operations/Reverse"));
    assert!(!matches("/dlb.v1.C*l/L*", "/dlb.v1.Control/StopInstance"));
}

#[test]
fn a_call_is_allowed_only_by_a_rule_naming_its_caller() {
    let policy = Policy::parse(
        "# control\n\
         /dlb.v1.Control/ListInstances = gateway, ui\n\
         /dlb.v1.Control/* = ui   # lifecycle\n\
         /grpc.health.v1.Health/* = *\n",
        "test",
    )
    .unwrap();
    let role = |r: &str| Caller::Spiffe(spiffe_id(r));
    assert!(
        policy
            .check("/dlb.v1.Control/ListInstances", &role("gateway"))
            .is_ok()
    );
    assert!(
        policy
            .check("/dlb.v1.Control/StopInstance", &role("ui"))
            .is_ok()
    );
    assert!(
        policy
            .check("/grpc.health.v1.Health/Check", &Caller::Anonymous)
            .is_ok()
    );
    let denied = policy
        .check("/dlb.v1.Control/StopInstance", &role("client"))
        .unwrap_err();
    assert_eq!(denied.rule.as_deref(), Some("/dlb.v1.Control/*"));
    assert_eq!(
        denied.to_string(),
        "spiffe://dlb.local/client may not call /dlb.v1.Control/StopInstance: the policy's rule \"/dlb.v1.Control/*\" does not name it"
    );
    // The most specific rule is the one named; the message never lists who is allowed.
    let denied = policy
        .check("/dlb.v1.Control/ListInstances", &role("client"))
        .unwrap_err();
    assert_eq!(
        denied.rule.as_deref(),
        Some("/dlb.v1.Control/ListInstances")
    );
    assert!(!denied.to_string().contains("ui"), "{denied}");
    let denied = policy
        .check("/other.Service/Call", &role("ui"))
        .unwrap_err();
    assert_eq!(denied.rule, None);
    assert!(
        denied
            .to_string()
            .ends_with("no rule of the policy allows it")
    );
    // A certificate without an identity is matched only by `*`.
    assert!(
        policy
            .check("/dlb.v1.Control/StopInstance", &Caller::Anonymous)
            .unwrap_err()
            .to_string()
            .starts_with("a certificate naming no spiffe:// identity may not call")
    );
    // A full spiffe:// identity names exactly that identity.
    let exact = Policy::parse("* = spiffe://dlb.local/team/alice", "test").unwrap();
    assert!(
        exact
            .check(
                "/x.Y/Z",
                &Caller::Spiffe("spiffe://dlb.local/team/alice".into())
            )
            .is_ok()
    );
    assert!(exact.check("/x.Y/Z", &role("team")).is_err());
}

#[test]
fn bad_policies_are_refused_with_the_line_and_the_reason() {
    for (text, expected) in [
        (
            "/dlb.v1.Control/*",
            "f line 1: \"/dlb.v1.Control/*\" is not a rule",
        ),
        (
            "\n\nControl = ui",
            "f line 3: \"Control\" is not a method pattern",
        ),
        (
            "/dlb.v1.Control/* =",
            "f line 1: rule \"/dlb.v1.Control/*\" names nobody",
        ),
        ("/a.B/C = Admin", "f line 1: \"Admin\" is not a role name"),
        (
            "/a.B/C = spiffe://",
            "f line 1: \"spiffe://\" is not a spiffe:// identity",
        ),
        ("/a.B/C = ui, a b", "f line 1: \"a b\" is not a role name"),
        ("# nothing\n", "f: no rules"),
    ] {
        let error = Policy::parse(text, "f").unwrap_err();
        assert!(error.starts_with(expected), "{text:?}: {error}");
    }
    let policy = Policy::parse("/dlb.v1.Contrl/* = ui\n", "f").unwrap();
    let error = policy.check_services(&["dlb.v1.Control"]).unwrap_err();
    assert!(
        error.contains("serves no service dlb.v1.Contrl")
            && error.contains("it serves dlb.v1.Control, grpc.health.v1.Health"),
        "{error}"
    );
    let wild = Policy::parse("/dlb.v1.*/Stop* = ui\n* = *", "f").unwrap();
    assert!(wild.check_services(&["dlb.v1.Control"]).is_ok());
}

#[test]
fn a_rule_naming_a_method_its_service_lacks_is_refused() {
    let known = policy::known_methods();
    let typo = Policy::parse("/dlb.v1.Operations/Revers = ui\n", "f").unwrap();
    let error = typo.check_methods(known).unwrap_err();
    assert!(
        error.contains("dlb.v1.Operations has no method Revers")
            && error.contains("Reverse")
            && error.contains("IsPrime"),
        "{error}"
    );
    let health = Policy::parse("/grpc.health.v1.Health/Chek = *\n", "f").unwrap();
    assert!(health.check_methods(known).is_err());
    // Real methods, patterns, and services only the instances behind a gateway know pass.
    for fine in [
        "/dlb.v1.Operations/Reverse = ui",
        "/dlb.v1.Control/StartInstance = ui",
        "/dlb.v1.Gateway/Stats = *",
        "/grpc.health.v1.Health/Check = *",
        "/dlb.v1.Operations/Rev* = ui",
        "/acme.Shop/Anything = ui",
    ] {
        let policy = Policy::parse(fine, "f").unwrap();
        assert!(policy.check_methods(known).is_ok(), "{fine}");
    }
}

#[test]
fn flags_add_rules_or_turn_the_policy_off() {
    let args = AuthzArgs {
        authz_policy: None,
        allow: vec!["/dlb.v1.Control/*=operator".into()],
    };
    let policy = args
        .policy("/dlb.v1.Control/* = ui", Some(&["dlb.v1.Control"]))
        .unwrap()
        .unwrap();
    assert_eq!(policy.rules().len(), 2);
    let operator = Caller::Spiffe(spiffe_id("operator"));
    assert!(
        policy
            .check("/dlb.v1.Control/StopInstance", &operator)
            .is_ok()
    );
    let off = AuthzArgs {
        authz_policy: Some("off".into()),
        allow: Vec::new(),
    };
    assert_eq!(off.policy("* = ui", None).unwrap(), None);
    let both = AuthzArgs {
        authz_policy: Some("off".into()),
        allow: vec!["*=ui".into()],
    };
    assert!(both.policy("* = ui", None).is_err());
    let missing = AuthzArgs {
        authz_policy: Some("/nonexistent/policy".into()),
        allow: Vec::new(),
    };
    let error = missing.policy("* = ui", None).unwrap_err();
    assert!(
        error.starts_with("--authz-policy /nonexistent/policy: cannot read it"),
        "{error}"
    );
    let bad_flag = AuthzArgs {
        authz_policy: None,
        allow: vec!["everything".into()],
    };
    assert!(
        bad_flag
            .policy("* = ui", None)
            .unwrap_err()
            .starts_with("--allow \"everything\": ")
    );
}

#[test]
fn roles_are_checked() {
    for good in ["ui", "operator", "team-a", "x.y_z", "0ps"] {
        assert!(check_role(good).is_ok(), "{good}");
    }
    for bad in ["", "Admin", "-x", "a/b", "a b", &"x".repeat(65)] {
        assert!(check_role(bad).is_err(), "{bad}");
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::env::temp_dir().join(format!("dlb-authz-{name}-{}-{nanos}", std::process::id()))
}

fn identity(path: &std::path::Path) -> Caller {
    crate::tls::identity_of(path).unwrap()
}

#[test]
fn certs_init_names_each_service_and_issue_makes_more_from_the_same_ca() {
    let dir = temp_dir("issue");
    crate::tls::init(&dir, &[]).unwrap();
    for name in crate::tls::SERVICES {
        assert_eq!(
            identity(&dir.join(format!("{name}.pem"))),
            Caller::Spiffe(spiffe_id(name))
        );
    }
    let files = crate::tls::issue(&dir, "alice", "operator").unwrap();
    assert_eq!(files, [dir.join("alice.pem"), dir.join("alice.key")]);
    assert_eq!(
        identity(&dir.join("alice.pem")),
        Caller::Spiffe(spiffe_id("operator"))
    );
    // Issued under the CA's name (the handshake tests in tests/up.rs check the signature).
    let der = |file: &str| {
        use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_file(dir.join(file)).unwrap()
    };
    assert_eq!(issuer(&der("alice.pem")), subject(&der("ca.pem")));
    // Never over an existing file; the name and role are checked.
    let again = crate::tls::issue(&dir, "alice", "operator").unwrap_err();
    assert!(again.contains("alice.pem exists already"), "{again}");
    let bad = crate::tls::issue(&dir, "bob", "Admin").unwrap_err();
    assert!(
        bad.starts_with("--role \"Admin\" is not a role name"),
        "{bad}"
    );
    assert!(crate::tls::issue(&dir, "ca", "x").is_err());
    assert!(!dir.join("bob.pem").exists());
    // Without a CA there, or with a key that is not the CA's: a clear error, nothing written.
    let empty = temp_dir("no-ca");
    let error = crate::tls::issue(&empty, "bob", "ops").unwrap_err();
    assert!(
        error.contains("ca.pem: cannot read it") && error.contains("dlb certs init"),
        "{error}"
    );
    std::fs::copy(dir.join("client.key"), dir.join("ca.key.other")).unwrap();
    std::fs::rename(dir.join("ca.key"), dir.join("ca.key.real")).unwrap();
    std::fs::rename(dir.join("ca.key.other"), dir.join("ca.key")).unwrap();
    let error = crate::tls::issue(&dir, "bob", "ops").unwrap_err();
    assert!(error.contains("ca.key is not the key of"), "{error}");
    assert!(!dir.join("bob.pem").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stars_backtrack_and_patterns_that_match_nothing_are_refused() {
    assert!(matches("/a*b*c", "/abXbc"));
    assert!(matches("*Instance", "/x/InstanceInstance"));
    assert!(matches("/a*a", "/aaa"));
    assert!(!matches("/a*b*c", "/abXbcd"));
    assert!(!matches("*Instance", "/x/Instances"));
    for pattern in ["/dlb.v1.Control", "/dlb.v1.Control/", "//Stop"] {
        let error = Policy::parse(&format!("{pattern} = ui"), "f").unwrap_err();
        assert!(
            error.contains("is not a method pattern"),
            "{pattern}: {error}"
        );
    }
}

/// The layer itself, on bare requests: under a policy that reads callers, a connection that
/// shows no client certificate is refused (fail closed), and refusals are counted.
#[tokio::test]
async fn the_layer_refuses_a_call_without_a_certificate_when_a_policy_is_on() {
    use tonic::codegen::http;
    use tower::{Layer, ServiceExt};
    let ok = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
    });
    let request = || {
        http::Request::builder()
            .uri("/dlb.v1.Control/StopInstance")
            .body(())
            .unwrap()
    };
    let (events, _writer) = EventLog::spawn(
        crate::events::EventLogConfig::disabled(),
        "control",
        "control",
    );
    let policy = Policy::parse("/dlb.v1.Control/* = ui", "test").unwrap();
    let guard = Guard::new(Some(policy), "control", events.clone());
    let response = AuthzLayer::new(guard.clone())
        .layer(ok)
        .oneshot(request())
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "7");
    assert!(
        response.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("a%20call%20without%20a%20client%20certificate"),
        "{response:?}"
    );
    assert_eq!(guard.denied(), 1);
    // A method of a service the server does not serve is not decided: the server answers
    // UNIMPLEMENTED as it would without TLS.
    let serving = Guard::new(
        Some(Policy::parse("/dlb.v1.Control/* = ui", "test").unwrap()),
        "control",
        events.clone(),
    )
    .serving(Some(vec!["dlb.v1.Control".into()]));
    let unknown = http::Request::builder()
        .uri("/foo.Bar/Baz")
        .body(())
        .unwrap();
    let response = AuthzLayer::new(serving.clone())
        .layer(ok)
        .oneshot(unknown)
        .await
        .unwrap();
    assert_eq!(response.into_body(), "served");
    let response = AuthzLayer::new(serving.clone())
        .layer(ok)
        .oneshot(request())
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "7");
    // No policy (plaintext, or --authz-policy off) and a policy allowing everyone: served.
    for guard in [
        Guard::default(),
        Guard::new(
            Some(Policy::parse("* = *", "test").unwrap()),
            "gateway",
            events.clone(),
        ),
    ] {
        let response = AuthzLayer::new(guard)
            .layer(ok)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.into_body(), "served");
    }
}
