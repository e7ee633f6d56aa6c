//! What an operator deploys beside the binary: the Grafana dashboard and
//! Prometheus rules under `contrib/` name only metrics the node exports, the
//! dashboard page at `/` is self-contained and hands its token to loopback
//! clients only, a stray SIGHUP neither stops nor reloads the node, and
//! (interop: Debian's systemd) the systemd unit passes `systemd-analyze verify`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::inproc::InProc;
use common::NodeConf;

/// Every `magicmx_*` name in the text (Prometheus suffixes of histograms
/// and summaries are the base metric's).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("magicmx_") {
        let start = i + at;
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'_')
                .count();
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        names.insert(name.to_string());
        i = end;
    }
    names
}

fn rust_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn contrib_names_only_metrics_the_node_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut src = String::new();
    rust_sources(&root.join("src"), &mut src);
    let mut checked = 0;
    for file in ["grafana-dashboard.json", "prometheus-alerts.yml"] {
        let text = std::fs::read_to_string(root.join("contrib").join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no magicmx metric");
        for name in names {
            // Metrics are recorded with `metrics::counter!("name", …)` and the
            // like: the quoted name is in the source.
            assert!(
                src.contains(&format!("\"{name}\"")),
                "contrib/{file} uses {name}, which the node never records"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} metric uses checked");
}

/// One HTTP request to the admin listener; (status line, headers, body).
fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

#[test]
fn the_dashboard_is_one_self_contained_page() {
    let node = InProc::start("");
    let get = |path: &str| {
        http(
            node.admin,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                node.admin
            ),
        )
    };
    let (status, headers, page) = get("/");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.to_ascii_lowercase().contains("text/html"),
        "{headers}"
    );
    assert!(page.contains("<title>magicmx t1</title>"), "{page}");
    // No CDN, no external script, style, image or font.
    for attr in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !page.contains(attr),
            "the page loads an external asset: {attr}"
        );
    }
    // The release and delete buttons need the token; a loopback client gets
    // it in the page (the same token the CLI reads from data_dir).
    let token = std::fs::read_to_string(node.dir.path().join("data/admin.token")).unwrap();
    assert!(
        page.contains(&format!(
            "<meta name=\"magicmx-token\" content=\"{}\">",
            token.trim()
        )),
        "the page does not carry the token"
    );
    // The JSON the page polls.
    let (status, _, history) = get("/history");
    assert!(status.contains(" 200 "), "{status}");
    let minutes: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(minutes.as_array().unwrap().len(), 60, "{history}");
    // A page from another site (DNS rebinding) is refused by the Host check.
    let (status, _, _) = http(
        node.admin,
        "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains(" 403 "), "{status}");
    // A state change without the token is refused, as the buttons' are
    // not when they carry it (see the browser test).
    let (status, _, _) = http(
        node.admin,
        &format!(
            "POST /quarantine/release?id=x HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            node.admin
        ),
    );
    assert!(status.contains(" 403 "), "{status}");
}

#[test]
fn sighup_is_logged_and_ignored() {
    // No mail is relayed: the real MX is never asked.
    let dns = common::DnsServer::start(&[]);
    let conf = NodeConf::new(dns.addr, 9);
    let mut node = common::node::Node::start(conf);
    node.signal("HUP");
    node.wait_log(&["SIGHUP ignored"], Duration::from_secs(10));
    assert!(node.is_running(), "SIGHUP stopped the node");
    let mut c = common::Client::connect(node.smtp_addr);
    assert_eq!(c.banner.code, 220);
    c.expect("QUIT", 221);
    node.signal("TERM");
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("the node did not stop on SIGTERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}

/// `systemd-analyze verify` on the shipped unit, with `ExecStart` pointing
/// at this build's binary (the unit names /usr/local/bin/magicmx, which
/// verify requires to exist).
#[cfg(feature = "interop")]
#[test]
fn the_systemd_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/magicmx.service")).unwrap();
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("magicmx.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/magicmx", common::node::BIN),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // verify prints warnings (unknown keys, bad values) without failing.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("magicmx.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complains:\n{text}");
}

/// Runs `magicmx demo ARGS` with stdout piped; the child and a channel of
/// its stdout lines.
fn start_demo(seconds: u64) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(common::node::BIN)
        .args(["demo", "--seconds", &seconds.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("magicmx demo");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("demo: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn the_demo_tells_its_story_and_exits_0() {
    let (mut child, lines) = start_demo(12);
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(60)) {
        seen.push(line);
    }
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert!(status.success(), "demo exited with {status}:\n{text}");
    for words in [
        "node demo3: SMTP 127.0.0.1:",
        "person, message 1: 250",
        "held 3s before relay",
        "real MX received \"Lunch on Friday? (3)\"",
        "throttled: 4",
        "quarantined:",
        "dashboard: http://127.0.0.1:",
        "summary: person 3/3 relayed",
        "scanner 127.0.4.9 sent `GET / HTTP/1.1` to demo1: 521",
        "scanner's neighbour 127.0.4.10 at demo3: 550 5.7.1",
    ] {
        assert!(
            text.contains(words),
            "no {words:?} in the demo's output:\n{text}"
        );
    }
    assert!(
        text.contains(", 0 relayed"),
        "a bot message was relayed:\n{text}"
    );
}

/// Debian's chromium, headless, on the dashboard of a demo node (peers,
/// blocks, a quarantine): what it shows is what `/status` says, and the
/// Release button releases. The screenshot goes to bench/dashboard.png.
#[cfg(feature = "interop")]
#[test]
fn a_browser_sees_the_dashboard_and_releases_a_message() {
    let (mut child, lines) = start_demo(240);
    let mut url = None;
    let mut done = false;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(60)) {
        done |= line.contains("] done: ");
        if done {
            if let Some(at) = line.find("dashboard: ") {
                url = Some(line[at + "dashboard: ".len()..].trim().to_string());
                break;
            }
        }
    }
    let url = url.expect("the demo printed no dashboard after its story");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shot = root.join("bench/dashboard.png");
    let out = std::process::Command::new("python3")
        .arg(root.join("tests/py/dashboard_browser.py"))
        .arg(&url)
        .arg(&shot)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let admin: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let quarantine = http(
        admin,
        &format!("GET /quarantine HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"),
    )
    .2;
    let _ = std::process::Command::new("kill")
        .args(["-s", "INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(
        out.status.success(),
        "browser check failed: {stderr}\n{stdout}"
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let released = seen["released"].as_str().unwrap();
    assert!(
        seen["message"].as_str().unwrap().contains("released"),
        "{seen}"
    );
    assert!(
        !quarantine.contains(released),
        "{released} is still in quarantine:\n{quarantine}"
    );
    assert!(!seen["peers"].as_array().unwrap().is_empty(), "{seen}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    assert!(status.success(), "demo exited with {status}");
}
