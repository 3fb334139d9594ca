//! MQTT over WebSocket from a real browser: headless Chromium (Debian's `chromium`)
//! driven by Playwright (`tests/browser/run.mjs`) opens the live topic viewer of
//! `examples/web/`, which connects with MQTT.js; `mosquitto_pub` publishes over TCP and
//! the page must show the message, then the page publishes and `mosquitto_sub` over TCP
//! must receive it.
//!
//! Needs `node`, `/usr/bin/chromium` (or `$CHROMIUM`), `mosquitto_pub`/`mosquitto_sub`
//! and `npm ci` in `tests/browser`; `.ci/run` installs them. Locally, the test is
//! skipped with a note when one is missing; in CI (`CI` set) a missing one is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use actimq::testing::TestNode;

fn on_path(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What is missing to run the browser test, if anything.
fn missing(browser_dir: &Path) -> Vec<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !on_path("node") {
        missing.push("node (apt-get install nodejs)".to_string());
    }
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install chromium)"));
    }
    if !on_path("mosquitto_pub") || !on_path("mosquitto_sub") {
        missing.push("mosquitto_pub/mosquitto_sub (apt-get install mosquitto-clients)".into());
    }
    for module in ["playwright-core", "mqtt"] {
        if !browser_dir.join("node_modules").join(module).exists() {
            missing.push(format!(
                "tests/browser/node_modules/{module} (npm ci in tests/browser)"
            ));
        }
    }
    missing
}

#[test]
fn browser_page_receives_what_mosquitto_pub_sends_over_websocket() {
    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let missing = missing(&browser_dir);
    if !missing.is_empty() {
        if std::env::var_os("CI").is_some() {
            panic!("CI must run the browser test, but these are missing: {missing:?}");
        }
        println!(
            "SKIPPED browser test (transport_browser): missing {}",
            missing.join(", ")
        );
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), |_| {});
    let ws_url = format!("ws://{}/mqtt", node.ws_addr());
    let tcp = node.mqtt_addr().to_string();

    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(browser_dir.join("run.mjs"))
        .arg(&ws_url)
        .arg(&tcp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    // run.mjs bounds itself at 90 s; this is the backstop.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break child.wait().expect("reap node");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().expect("output of node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        status.success(),
        "browser test failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("page received: hello from mosquitto_pub"),
        "{stdout}"
    );
    assert!(stdout.contains("browser test passed"), "{stdout}");
    node.stop();
}
