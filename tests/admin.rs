//! The admin listener against what a hostile network or a hostile web page
//! can do: hold connections open, reach it through DNS rebinding (a page
//! whose requests carry its own host name), or post a cross-site form to
//! the quarantine actions. The CLI, which has the node's token, still works
//! (tests/throttle.rs releases quarantined mail through it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::Client;

/// Sends one raw request; the status code and the whole answer.
fn http(node: &InProc, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(node.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn idle_admin_connections_are_bounded_and_time_out() {
    // Lines before any section header of the tail still belong to [admin].
    let node = InProc::start("max_connections = 3\nrequest_timeout = \"1s\"\n");
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(node.admin).unwrap())
        .collect();
    // Give the accept loop a moment to take all three.
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let (code, text) = http(
        &node,
        &format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", node.admin),
    );
    assert_eq!(code, 503, "over admin.max_connections: {text:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // SMTP is not affected.
    let _c = Client::connect(node.smtp);
    // The idle ones are closed after request_timeout and their slots return.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(node.http_get("/healthz").contains("ok"));
}

#[test]
fn requests_for_another_host_are_refused() {
    let node = InProc::start("hosts = [\"mgmt.example.net\"]\n");
    let port = node.admin.port();
    // A DNS-rebinding page: the browser sends the page's own host name.
    for host in [
        format!("rebind.attacker.example:{port}"),
        "attacker.example".into(),
    ] {
        for path in ["/quarantine", "/status", "/metrics"] {
            let (code, text) = http(
                &node,
                &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            );
            assert_eq!(code, 403, "{path} for Host {host}: {text}");
        }
    }
    let (code, _) = http(&node, "GET /quarantine HTTP/1.1\r\n\r\n");
    assert_eq!(code, 403, "no Host at all");
    for host in [
        node.admin.to_string(),
        format!("localhost:{port}"),
        "mgmt.example.net".into(),
    ] {
        let (code, text) = http(
            &node,
            &format!("GET /quarantine HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert_eq!(code, 200, "Host {host}: {text}");
    }
}

#[test]
fn state_changes_need_the_token() {
    let node = InProc::start("");
    let host = node.admin;
    // A cross-site form can post, with the right Host even, but cannot add
    // a header.
    let form = format!(
        "POST /quarantine/delete?id=0000000000000001 HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\n\r\n"
    );
    let (code, text) = http(&node, &form);
    assert_eq!(code, 403, "{text}");
    let (code, text) = http(
        &node,
        &form.replace(
            "Host:",
            "X-Magicmx-Token: 00000000000000000000000000000000\r\nHost:",
        ),
    );
    assert_eq!(code, 403, "a guessed token: {text}");
    let token_file = node.dir.path().join("data").join("admin.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the token file is readable by others");
    }
    let (code, text) = http(
        &node,
        &form.replace(
            "Host:",
            &format!("X-Magicmx-Token: {}\r\nHost:", token.trim()),
        ),
    );
    assert_eq!(
        code, 404,
        "the operator's request reaches the route: {text}"
    );
    // And the CLI sends it.
    let (ok, text) = node.cli(&["queue", "quarantine", "delete", "0000000000000001"]);
    assert!(
        !ok && text.contains("no such quarantined message"),
        "{text}"
    );
}
