//! The dashboard in a real headless Chromium (through chromedriver) against a real mesh:
//! control with three compute processes, a gateway, Redis. What a user sees and clicks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::TestMesh;
use support::webdriver::Browser;

use dlb::testing::PATIENCE;

/// Form fields to fill: `(css selector, text)`.
type Inputs<'a> = &'a [(&'a str, &'a str)];

/// `{lifecycle, health, trail}` texts of instance `id`'s row, or null while it has none.
const ROW: &str = "
    const row = document.querySelector(`#instances tr[data-id=\"${arguments[0]}\"]`);
    if (!row) return null;
    return {
        lifecycle: row.querySelector('td.state .pill').textContent,
        health: row.querySelector('td.health .pill').textContent,
        trail: [...row.querySelectorAll('.trail b')].map((b) => b.textContent),
    };";

async fn wait_row(browser: &Browser, id: &str, lifecycle: &str, health: &str) -> Value {
    let script = format!(
        "{ROW_FN} const r = row(arguments[0]); \
         return r && r.lifecycle === arguments[1] && r.health === arguments[2] ? r : null;",
        ROW_FN = format_args!("function row() {{ {ROW} }}")
    );
    browser
        .wait_for(
            &format!("{id} to show {lifecycle} / {health}"),
            &script,
            json!([id, lifecycle, health]),
            PATIENCE,
        )
        .await
}

/// Runs one operation from the form like a user; returns `(result text, served-by)`.
async fn run_op(browser: &Browser, op: &str, inputs: &[(&str, &str)]) -> (String, String) {
    browser.click(&format!("#op option[value=\"{op}\"]")).await;
    for (css, text) in inputs {
        browser.type_into(css, text).await;
    }
    browser
        .eval(
            "document.getElementById('result').textContent = ''; \
             document.getElementById('result-served-by').textContent = '';",
            json!([]),
        )
        .await;
    browser.click("#run").await;
    let shown = browser
        .wait_for(
            &format!("the result of {op}"),
            "const r = document.getElementById('result').textContent; \
             const s = document.getElementById('result-served-by').textContent; \
             return r && s ? [r, s] : null;",
            json!([]),
            PATIENCE,
        )
        .await;
    (
        shown[0].as_str().unwrap().to_owned(),
        shown[1].as_str().unwrap().to_owned(),
    )
}

/// Waits for an event row whose summary contains `needle`; returns its summary.
async fn wait_event(browser: &Browser, needle: &str) -> String {
    browser
        .wait_for(
            &format!("an event mentioning {needle:?}"),
            "const li = [...document.querySelectorAll('#events li .summary')]
                 .find((s) => s.textContent.includes(arguments[0]));
             return li ? li.textContent : null;",
            json!([needle]),
            PATIENCE,
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

/// The requests cell of instance `id`'s row.
async fn requests_of(browser: &Browser, id: &str) -> u64 {
    let text = browser
        .eval(
            "const td = document.querySelector(`#instances tr[data-id=\"${arguments[0]}\"] td.requests`);
             return td ? td.textContent : '';",
            json!([id]),
        )
        .await;
    text.as_str()
        .unwrap()
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

/// The header's text and the sum of the rows' requests cells, read at once.
async fn header_and_rows(browser: &Browser) -> (String, u64) {
    let read = browser
        .eval(
            "return [document.getElementById('gateway-settings').textContent,
                     [...document.querySelectorAll('#instances td.requests')]
                         .reduce((n, td) => n + Number(td.textContent.replace(/[^0-9]/g, '')), 0)];",
            json!([]),
        )
        .await;
    (
        read[0].as_str().unwrap().to_owned(),
        read[1].as_u64().unwrap(),
    )
}

/// `n` as the page writes counts (`toLocaleString`, en-US in the test browser).
fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A call through the gateway that came with a W3C `traceparent`: its event row shows the
/// trace id.
async fn traced_row(browser: &Browser, gateway: &str) {
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut traced = tonic::Request::new(dlb::proto::v1::ReverseRequest {
        text: "traced row".into(),
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let gateway = tonic::transport::Channel::from_shared(gateway.to_owned())
        .unwrap()
        .connect_lazy();
    dlb::proto::v1::operations_client::OperationsClient::new(gateway)
        .reverse(traced)
        .await
        .unwrap();
    let summary = wait_event(browser, trace).await;
    assert!(summary.contains(&format!("trace {trace}")), "{summary}");
}

/// A's CPU, memory and uptime cells, read twice 3 s apart, move: the page gets them from
/// control at most about 2 s old, not only when a state changes.
async fn live_resources_move(browser: &Browser) {
    let resources = "const row = document.querySelector('#instances tr[data-id=\"A\"]');
                     const td = row.querySelectorAll('td');
                     return [td[10].textContent, td[11].textContent, td[12].textContent];";
    // Once the row shows a running process's values at all...
    let before = browser
        .wait_for(
            "A's uptime to show",
            &format!(
                "const cells = (() => {{ {resources} }})(); return cells[2] !== '–' ? cells : null;"
            ),
            json!([]),
            PATIENCE,
        )
        .await;
    // ...they keep moving, with no state change in between.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = browser.eval(resources, json!([])).await;
    println!("A's cpu, memory, uptime: {before} then {after}");
    assert_ne!(before[2], after[2], "uptime moves: {before} then {after}");
    assert!(
        after[2] != "0 s" && after[1] != "–" && !after[1].as_str().unwrap().starts_with("0 "),
        "live uptime and memory: {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_runs_the_mesh_in_a_real_browser() {
    let mut mesh = TestMesh::start(3).await;
    let browser = Browser::start().await;
    let url = mesh.ui.uri();
    browser.goto(&url).await;

    // Page weight of a full load: the document and every asset (the event stream stays open
    // and is counted by its headers only).
    let weight = browser
        .wait_for(
            "the page's resources to load",
            "const nav = performance.getEntriesByType('navigation')[0];
             if (!nav || nav.loadEventEnd === 0) return null;
             const res = performance.getEntriesByType('resource');
             return { bytes: nav.transferSize + res.reduce((n, r) => n + r.transferSize, 0),
                      files: 1 + res.length,
                      foreign: res.map((r) => r.name)
                          .filter((name) => new URL(name).origin !== location.origin) };",
            json!([]),
            PATIENCE,
        )
        .await;
    println!("page weight: {weight}");
    assert_eq!(
        weight["foreign"],
        json!([]),
        "every asset from the dashboard itself"
    );
    // A budget, not a speed claim: the page stays small enough to keep open all day.
    let bytes = weight["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < 100_000, "page weight {bytes} bytes");

    // Until its first data arrive the page says it is loading, not that there is nothing.
    let first_paint = browser
        .eval(
            "return fetch('/').then((r) => r.text()).then((html) => {
                 const page = new DOMParser().parseFromString(html, 'text/html');
                 return page.getElementById('events-empty').textContent;
             });",
            json!([]),
        )
        .await;
    assert_eq!(first_paint, "Loading events…");

    // A, B and C serving, as control and the gateway see them.
    for id in ["A", "B", "C"] {
        wait_row(&browser, id, "serving", "serving").await;
    }
    // Boxed: the test's future is large, and the test thread's stack is not.
    Box::pin(live_resources_move(&browser)).await;
    let settings = browser
        .eval(
            "return document.getElementById('gateway-settings').textContent",
            json!([]),
        )
        .await;
    assert!(
        settings.as_str().unwrap().contains("policy round-robin"),
        "{settings}"
    );

    // Each operation from the form: the right result and who served it.
    let cases: [(&str, Inputs, &str); 5] = [
        ("prime", &[("#input-number", "97")], "prime (certainty"),
        (
            "palindrome",
            &[("#input-text", "A man, a plan, a canal: Panama")],
            "palindrome: no",
        ),
        ("reverse", &[("#input-text", "stressed")], "desserts"),
        ("fib", &[("#input-n", "90")], "2880067194370816120"),
        (
            "wc",
            &[("#input-text", "the cat the hat"), ("#input-top", "2")],
            "words 4",
        ),
    ];
    let mut served = BTreeSet::new();
    for (op, inputs, want) in cases {
        let (text, served_by) = run_op(&browser, op, inputs).await;
        assert!(
            text.starts_with(want),
            "{op}: {text:?} should start with {want:?}"
        );
        assert!(
            ["A", "B", "C"].contains(&served_by.as_str()),
            "{op}: {served_by}"
        );
        served.insert(served_by);
    }
    // Round robin over three instances: five calls reach all of them.
    assert_eq!(served.len(), 3, "{served:?}");
    // The normalize flag is a typed input of its own.
    browser.click("#op option[value=\"palindrome\"]").await;
    browser.click("#input-normalize").await;
    let (text, _) = run_op(
        &browser,
        "palindrome",
        &[("#input-text", "A man, a plan, a canal: Panama")],
    )
    .await;
    assert_eq!(text, "palindrome: yes");
    // Bad input is a readable message, and the mesh keeps serving.
    let (text, _) = run_op(&browser, "prime", &[("#input-number", "12abc")]).await;
    assert!(text.starts_with("INVALID_ARGUMENT: "), "{text}");

    // The call shows up in the events panel without a reload. The page itself times it: from
    // the click to the result shown, and to the event's row appearing.
    let marker = format!("e2e-{}", std::process::id());
    browser.click("#op option[value=\"reverse\"]").await;
    browser.type_into("#input-text", &marker).await;
    browser
        .eval(
            "const marker = arguments[0];
             window.dlbTiming = { start: performance.now() };
             new MutationObserver((_, observer) => {
                 const t = window.dlbTiming;
                 if (!t.result && document.getElementById('result-served-by').textContent
                         && document.getElementById('result').textContent.includes('-e2e')) {
                     t.result = performance.now() - t.start;
                 }
                 if ([...document.querySelectorAll('#events li .summary')]
                         .some((s) => s.textContent.includes(marker))) {
                     t.event = performance.now() - t.start;
                     observer.disconnect();
                 }
             }).observe(document.body, { subtree: true, childList: true, characterData: true });
             document.getElementById('run').click();",
            json!([marker]),
        )
        .await;
    let timing = browser
        .wait_for(
            "the call's event in the panel",
            "const t = window.dlbTiming; return t.event !== undefined ? t : null;",
            json!([]),
            PATIENCE,
        )
        .await;
    let summary = wait_event(&browser, &marker).await;
    assert!(summary.starts_with("Reverse → "), "{summary}");

    println!(
        "click to result shown: {:.1} ms; click to event row shown: {:.1} ms",
        timing["result"].as_f64().unwrap_or(f64::NAN),
        timing["event"].as_f64().unwrap()
    );

    // HTML in text is shown as text and injects nothing.
    for hostile in ["<img src=x onerror=alert(1)>", "<script>"] {
        let (text, _) = run_op(&browser, "reverse", &[("#input-text", hostile)]).await;
        assert_eq!(text, hostile.chars().rev().collect::<String>());
        let summary = wait_event(&browser, hostile).await;
        assert!(
            summary.contains(&format!("input \"{hostile}\"")),
            "{summary}"
        );
    }
    // Calls by method: the Reverse calls just made are counted in their row (as text).
    let row = browser
        .wait_for(
            "the Reverse row of the methods table",
            "const tr = document.querySelector('#methods tr[data-method=\"/dlb.v1.Operations/Reverse\"]');
             if (!tr) return null;
             const cells = [...tr.children].map((td) => td.textContent);
             return Number(cells[2].replace(/[^0-9]/g, '')) >= 3 ? cells : null;",
            json!([]),
            PATIENCE,
        )
        .await;
    assert_eq!(row[1], "default", "{row}");
    assert_eq!(row[3], "0", "{row}");
    let dom = browser
        .eval(
            "return { imgs: document.querySelectorAll('img').length,
                      scripts: [...document.scripts].map((s) => s.getAttribute('src')) };",
            json!([]),
        )
        .await;
    assert_eq!(dom, json!({ "imgs": 0, "scripts": ["/assets/app.js"] }));
    assert_eq!(browser.alert_text().await, None, "no script ran");

    // The events panel: strictly newest first.
    let times = browser
        .eval(
            "return [...document.querySelectorAll('#events li')].map((li) => Number(li.dataset.ts));",
            json!([]),
        )
        .await;
    let times: Vec<u64> = serde_json::from_value(times).unwrap();
    assert!(times.len() >= 10, "{times:?}");
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    // Stop B: draining, then stopped; out of the gateway's rotation; calls go to A and C.
    let b_before = requests_of(&browser, "B").await;
    assert!(b_before > 0);
    browser
        .click("#instances tr[data-id=\"B\"] button[data-action=\"stop\"]")
        .await;
    let b = wait_row(&browser, "B", "stopped", "not in rotation").await;
    // Stopped, it keeps what it served.
    assert_eq!(requests_of(&browser, "B").await, b_before);
    let trail: Vec<&str> = b["trail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        trail[trail.len() - 2..],
        ["draining", "stopped"],
        "{trail:?}"
    );
    let status = browser
        .eval(
            "return document.getElementById('action-status').textContent",
            json!([]),
        )
        .await;
    assert_eq!(status, "B: stopped");
    for _ in 0..6 {
        let (_, served_by) = run_op(&browser, "reverse", &[("#input-text", "after stop")]).await;
        assert!(["A", "C"].contains(&served_by.as_str()), "{served_by}");
    }
    // Start brings it back.
    browser
        .click("#instances tr[data-id=\"B\"] button[data-action=\"start\"]")
        .await;
    wait_row(&browser, "B", "serving", "serving").await;
    let mut served = BTreeSet::new();
    for _ in 0..6 {
        served.insert(
            run_op(&browser, "reverse", &[("#input-text", "after start")])
                .await
                .1,
        );
    }
    assert!(served.contains("B"), "{served:?}");
    // Started again (same id), it goes on counting from there.
    let b_after = browser
        .wait_for(
            "B's total to go on from before its stop",
            "const td = document.querySelector('#instances tr[data-id=\"B\"] td.requests');
             const n = td ? Number(td.textContent.replace(/[^0-9]/g, '')) : 0;
             return n > arguments[0] ? n : null;",
            json!([b_before]),
            PATIENCE,
        )
        .await;
    println!("B served {b_before} calls before its stop, {b_after} in all after its start");
    // The header's call count says how many the instances in the rows answered: their sum.
    let (header, rows) = header_and_rows(&browser).await;
    assert!(
        header.contains(&format!("({} by the instances below)", fmt_count(rows))),
        "{header} / {rows}"
    );
    assert!(
        header.contains("failed (any status but OK, callers' bad input included)"),
        "{header}"
    );

    // Let the chart gather a few points, then save what the page looks like.
    browser
        .wait_for(
            "the chart legend",
            "return document.querySelectorAll('#legend span.swatch').length >= 3",
            json!([]),
            PATIENCE,
        )
        .await;
    let shot = browser.save_screenshot("dashboard").await;
    println!("screenshot: {}", shot.display());

    // Kill C: it shows as killed, not as a drain.
    browser
        .eval("window.confirm = () => true;", json!([]))
        .await;
    browser
        .click("#instances tr[data-id=\"C\"] button[data-action=\"kill\"]")
        .await;
    let c = wait_row(&browser, "C", "stopped", "not in rotation").await;
    let trail: Vec<&str> = c["trail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(trail[trail.len() - 2..], ["serving", "killed"], "{trail:?}");
    // Removed, it leaves the table and the chart's legend.
    browser
        .click("#instances tr[data-id=\"C\"] button[data-action=\"remove\"]")
        .await;
    browser
        .wait_for(
            "C gone from the table and the legend",
            "const row = document.querySelector('#instances tr[data-id=\"C\"]');
             const legend = [...document.querySelectorAll('#legend span')].map((s) => s.textContent);
             return !row && legend.length > 0 && !legend.some((t) => t.startsWith('C ')) ? legend : null;",
            json!([]),
            PATIENCE,
        )
        .await;

    // Boxed (the test's future is large): a call that came with a W3C traceparent shows its trace id.
    Box::pin(traced_row(&browser, &mesh.gateway.uri())).await;

    // Redis stopped: the page still loads, shows the banner, and the rest works.
    mesh.redis.stop();
    browser.goto(&url).await;
    let banner = browser
        .wait_for(
            "the Redis banner",
            "const b = [...document.querySelectorAll('#banners .banner')]
                 .find((b) => b.textContent.includes('Event log'));
             return b ? b.textContent : null;",
            json!([]),
            PATIENCE,
        )
        .await;
    assert!(banner.as_str().unwrap().contains("unreachable"), "{banner}");
    wait_row(&browser, "A", "serving", "serving").await;
    let (text, served_by) = run_op(&browser, "reverse", &[("#input-text", "still here")]).await;
    assert_eq!(text, "ereh llits");
    assert!(!served_by.is_empty());
    let shot = browser.save_screenshot("dashboard-redis-down").await;
    println!("screenshot: {}", shot.display());

    drop(browser);
    mesh.shutdown().await;
}
