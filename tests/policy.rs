//! The Postfix policy service over TCP, driven the way Postfix drives it:
//! one persistent connection, `name=value` lines, an empty line, one
//! `action=` answer per request. The server runs in-process through the
//! library; the last tests run the `magicmx policy` command and a node with
//! `[policy] listen` to check the wiring.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magicmx::policy::{PeerAddrs, PolicyServer, PolicySettings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(10);

fn settings() -> PolicySettings {
    PolicySettings {
        trusted: vec!["127.0.10.0/24".parse().unwrap()],
        magic_nodes: vec!["127.0.20.1/32".parse().unwrap()],
        polite_refusals: 3,
        polite_period: Duration::from_secs(3_600),
        ipv4_prefix: 24,
        ipv6_prefix: 48,
        max_tracked_blocks: 1_000,
        max_connections: 16,
        max_connections_per_client: 16,
        request_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
    }
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(settings: PolicySettings, peers: Option<PeerAddrs>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = PolicyServer::new(settings, peers);
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    Server {
        addr,
        shutdown,
        task,
    }
}

/// A Postfix `smtpd` process's side of the protocol.
struct Postfix {
    conn: BufReader<TcpStream>,
}

impl Postfix {
    async fn connect(addr: SocketAddr) -> Postfix {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Postfix {
            conn: BufReader::new(stream),
        }
    }

    /// The request Postfix sends at RCPT TO (Postfix 3.7 attribute set).
    fn rcpt_request(client: &str, state: &str) -> String {
        format!(
            "request=smtpd_access_policy\nprotocol_state={state}\nprotocol_name=ESMTP\n\
             client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n\
             client_port=40000\nhelo_name=sender.example\nsender=alice@sender.example\n\
             recipient=bob@example.test\nrecipient_count=0\nqueue_id=\ninstance=1a2b.3c4d.1\n\
             size=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n\
             ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
             encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n\
             etrn_domain=\npolicy_context=\nserver_address=127.0.0.1\nserver_port=25\n\
             compatibility_level=3.6\nmail_version=3.7.11\n\n"
        )
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.conn.get_mut().write_all(bytes).await.expect("send");
    }

    /// Reads one answer: its `action=` value (other attributes are ignored).
    async fn answer(&mut self) -> Option<String> {
        let mut action = None;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(TIMEOUT, self.conn.read_line(&mut line))
                .await
                .expect("answer in time")
                .unwrap_or(0);
            if n == 0 {
                assert!(action.is_none(), "connection closed inside an answer");
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                return Some(action.expect("answer without action="));
            }
            if let Some(v) = line.strip_prefix("action=") {
                action = Some(v.to_string());
            }
        }
    }

    async fn ask(&mut self, client: &str) -> String {
        self.send(Self::rcpt_request(client, "RCPT").as_bytes())
            .await;
        self.answer().await.expect("an answer")
    }

    /// [`Postfix::ask`] for a client that showed a TLS certificate whose
    /// public-key fingerprint is `key` (`smtpd_tls_ask_ccert = yes`).
    async fn ask_with_key(&mut self, client: &str, key: &str) -> String {
        let request = Self::rcpt_request(client, "RCPT").replace(
            "ccert_pubkey_fingerprint=\n",
            &format!("ccert_pubkey_fingerprint={key}\n"),
        );
        self.send(request.as_bytes()).await;
        self.answer().await.expect("an answer")
    }

    /// True if the server closed the connection (EOF within the timeout).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(TIMEOUT, self.conn.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn is_polite(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT 4.7.1 ") && action.contains("MX")
}

fn is_reject(action: &str) -> bool {
    action.starts_with("REJECT 5.7.1 ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polite_then_reject_on_one_connection() {
    let server = start(settings(), None).await;
    let mut pf = Postfix::connect(server.addr).await;
    for i in 1..=3 {
        let a = pf.ask(&format!("127.0.66.{i}")).await;
        assert!(is_polite(&a), "request {i}: {a}");
    }
    let a = pf.ask("127.0.66.200").await;
    assert!(is_reject(&a), "{a}");
    assert!(is_reject(&pf.ask("127.0.66.1").await));
    // Another block, and another connection, start polite.
    assert!(is_polite(&pf.ask("127.0.67.1").await));
    let mut pf2 = Postfix::connect(server.addr).await;
    assert!(is_polite(&pf2.ask("127.0.68.1").await));
    // The counts are per block, not per connection.
    assert!(is_reject(&pf2.ask("127.0.66.9").await));
    server.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, server.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_magic_and_peers_are_dunno() {
    let peers: PeerAddrs = Arc::new(|| vec!["127.0.30.7".parse().unwrap()]);
    let server = start(settings(), Some(peers)).await;
    let mut pf = Postfix::connect(server.addr).await;
    for client in [
        "127.0.10.5",
        "127.0.20.1",
        "::ffff:127.0.20.1",
        "127.0.30.7",
    ] {
        for _ in 0..5 {
            assert_eq!(pf.ask(client).await, "DUNNO", "{client}");
        }
    }
    // Only the listed magic address, not its block.
    assert!(is_polite(&pf.ask("127.0.20.2").await));
    assert!(is_polite(&pf.ask("127.0.30.8").await));
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rcpt_is_judged() {
    let server = start(settings(), None).await;
    let mut pf = Postfix::connect(server.addr).await;
    for state in ["CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE"] {
        for _ in 0..5 {
            pf.send(Postfix::rcpt_request("127.0.70.1", state).as_bytes())
                .await;
            assert_eq!(pf.answer().await.unwrap(), "DUNNO", "{state}");
        }
    }
    assert!(
        is_polite(&pf.ask("127.0.70.1").await),
        "nothing counted before RCPT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(settings(), None).await;
    let mut pf = Postfix::connect(server.addr).await;
    let mut batch = String::new();
    for client in [
        "127.0.10.1",
        "127.0.71.1",
        "127.0.71.2",
        "127.0.71.3",
        "127.0.71.4",
    ] {
        batch += &Postfix::rcpt_request(client, "RCPT");
    }
    // Sent a few bytes at a time, as TCP may deliver it.
    for chunk in batch.as_bytes().chunks(7) {
        pf.send(chunk).await;
    }
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(pf.answer().await.unwrap());
    }
    assert_eq!(answers[0], "DUNNO");
    assert!(answers[1..4].iter().all(|a| is_polite(a)), "{answers:?}");
    assert!(is_reject(&answers[4]), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_temporary_error_and_the_connection_survives() {
    let server = start(settings(), None).await;
    let mut pf = Postfix::connect(server.addr).await;
    let cases: [&[u8]; 5] = [
        b"request=smtpd_access_policy\nthis line has no equals sign\nclient_address=127.0.72.1\n\n",
        b"protocol_state=RCPT\nclient_address=127.0.72.1\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=not-an-ip\n\n",
        b"\n",
    ];
    for case in cases {
        pf.send(case).await;
        let a = pf.answer().await.expect("an answer");
        assert!(
            a.starts_with("DEFER_IF_PERMIT 4.3.5 "),
            "{:?} → {a}",
            String::from_utf8_lossy(case)
        );
    }
    // Binary junk inside a value is only a value.
    pf.send(b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=\xff\xfe\nclient_address=127.0.10.1\n\n")
        .await;
    assert_eq!(pf.answer().await.unwrap(), "DUNNO");
    // The same connection still works, and nothing malformed was counted.
    assert!(is_polite(&pf.ask("127.0.72.1").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_answered_then_closed() {
    let server = start(settings(), None).await;
    // A line without end.
    let mut pf = Postfix::connect(server.addr).await;
    pf.send(b"request=smtpd_access_policy\nsender=").await;
    pf.send(&vec![b'a'; 10_000]).await;
    let a = pf.answer().await.expect("an answer before closing");
    assert!(a.starts_with("DEFER_IF_PERMIT 4.3.5 "), "{a}");
    assert!(pf.closed().await, "closed after losing the framing");
    // A request that never ends.
    let mut pf = Postfix::connect(server.addr).await;
    let line = format!("x={}\n", "b".repeat(1_000));
    let mut closed = false;
    for _ in 0..100 {
        if pf.conn.get_mut().write_all(line.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    if !closed {
        let a = pf.answer().await.expect("an answer before closing");
        assert!(a.contains("4.3.5"), "{a}");
        assert!(pf.closed().await);
    }
    // The server still serves others.
    let mut pf = Postfix::connect(server.addr).await;
    assert!(is_polite(&pf.ask("127.0.73.1").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_and_idle_ones_closed() {
    let mut s = settings();
    s.max_connections = 2;
    s.idle_timeout = Duration::from_millis(700);
    let server = start(s, None).await;
    let mut a = Postfix::connect(server.addr).await;
    let mut b = Postfix::connect(server.addr).await;
    assert_eq!(a.ask("127.0.10.1").await, "DUNNO");
    assert_eq!(b.ask("127.0.10.1").await, "DUNNO");
    // The third is closed at once (Postfix treats that as a temporary failure).
    let mut c = Postfix::connect(server.addr).await;
    let request = Postfix::rcpt_request("127.0.10.1", "RCPT");
    let _ = c.conn.get_mut().write_all(request.as_bytes()).await;
    assert_eq!(c.answer().await, None);
    // Idle connections are closed, freeing their slots.
    let t0 = Instant::now();
    assert!(a.closed().await);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(b.closed().await);
    let mut d = Postfix::connect(server.addr).await;
    assert_eq!(d.ask("127.0.10.1").await, "DUNNO");
}

/// Connections that never finish a request (no terminating empty line, or
/// nothing at all) are closed after `request_timeout`, not `idle_timeout`:
/// a thousand of them cannot hold the slots Postfix needs for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_are_closed_after_request_timeout() {
    let mut s = settings();
    s.request_timeout = Duration::from_millis(500);
    s.idle_timeout = Duration::from_secs(60);
    let server = start(s, None).await;
    let t0 = Instant::now();
    let mut silent = Postfix::connect(server.addr).await;
    let mut partial = Postfix::connect(server.addr).await;
    let request = Postfix::rcpt_request("127.0.10.1", "RCPT");
    // Everything but the terminating empty line.
    partial
        .send(request.trim_end_matches('\n').as_bytes())
        .await;
    partial.send(b"\n").await;
    assert!(silent.closed().await, "a silent connection stays open");
    assert!(partial.closed().await, "an unfinished request stays open");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t0.elapsed()
    );
    // A connection that finished its request may then idle (Postfix keeps
    // its connection between requests), well past request_timeout.
    let mut pf = Postfix::connect(server.addr).await;
    assert_eq!(pf.ask("127.0.10.1").await, "DUNNO");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(pf.ask("127.0.10.1").await, "DUNNO");
}

/// One client address gets at most `max_connections_per_client` slots;
/// other clients are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_address_are_bounded() {
    let mut s = settings();
    s.max_connections = 16;
    s.max_connections_per_client = 2;
    let server = start(s, None).await;
    let addr = server.addr;
    let from = |ip: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        Postfix {
            conn: BufReader::new(sock.connect(addr).await.unwrap()),
        }
    };
    let mut a = from("127.0.0.7").await;
    let mut b = from("127.0.0.7").await;
    assert_eq!(a.ask("127.0.10.1").await, "DUNNO");
    assert_eq!(b.ask("127.0.10.1").await, "DUNNO");
    let mut c = from("127.0.0.7").await;
    let request = Postfix::rcpt_request("127.0.10.1", "RCPT");
    let _ = c.conn.get_mut().write_all(request.as_bytes()).await;
    assert_eq!(
        c.answer().await,
        None,
        "a third connection from one address"
    );
    let mut d = from("127.0.0.8").await;
    assert_eq!(d.ask("127.0.10.1").await, "DUNNO", "another address");
    drop(a);
    let mut freed = false;
    for _ in 0..50 {
        let mut e = from("127.0.0.7").await;
        let _ = e.conn.get_mut().write_all(request.as_bytes()).await;
        if e.answer().await.is_some() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "no slot for the address after one of its connections ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_connections() {
    let server = start(settings(), None).await;
    let mut pf = Postfix::connect(server.addr).await;
    assert_eq!(pf.ask("127.0.10.1").await, "DUNNO");
    server.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, server.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(pf.closed().await);
}

/// A `magicmx` process whose stderr is watched for `policy listening addr=`.
struct Process {
    child: Child,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Process {
    fn start(args: &[&str], config: &str) -> (Process, SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let config = config.replace("DATA_DIR", &dir.path().join("data").display().to_string());
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(common::node::BIN)
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("MAGICMX_LOG", "info,magicmx=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn magicmx");
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        let mut p = Process {
            child,
            logs,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = p.logs.lock().unwrap().iter().find_map(|l| {
                let at = l.find("policy listening")?;
                let rest = &l[at..];
                let v = rest[rest.find("addr=")? + 5..].split_whitespace().next()?;
                v.trim_matches('"').parse::<SocketAddr>().ok()
            });
            if let Some(addr) = found {
                return (p, addr);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "magicmx {args:?} exited with {status}: {:#?}",
                    p.logs.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `policy listening` line: {:#?}",
                p.logs.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- magicmx logs:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
        }
    }
}

const POLICY_CONFIG: &str = r#"
[node]
name = "policy"
hostname = "mail.example.test"
data_dir = "DATA_DIR"

[smtp]
listen = ["127.0.0.1:0"]

[trust]
networks = ["127.0.10.0/24"]

[policy]
listen = "127.0.0.1:0"
magic_nodes = ["127.0.20.1/32"]
polite_refusals = 2
polite_period = "1h"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magicmx_policy_command() {
    let (_p, addr) = Process::start(&["policy"], POLICY_CONFIG);
    let mut pf = Postfix::connect(addr).await;
    assert_eq!(pf.ask("127.0.10.9").await, "DUNNO");
    assert_eq!(pf.ask("127.0.20.1").await, "DUNNO");
    assert!(is_polite(&pf.ask("127.0.80.1").await));
    assert!(is_polite(&pf.ask("127.0.80.2").await));
    assert!(is_reject(&pf.ask("127.0.80.3").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_listen_inside_a_node() {
    let (_p, addr) = Process::start(&["run"], POLICY_CONFIG);
    let mut pf = Postfix::connect(addr).await;
    assert_eq!(pf.ask("127.0.20.1").await, "DUNNO");
    assert!(is_polite(&pf.ask("127.0.81.1").await));
}

/// `magicmx policy` with `[policy] network_keys` (the file `magicmx ca
/// issue` writes): a client whose certificate key is listed is let in, by
/// its key alone, from any address; others are strangers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magicmx_policy_with_network_keys() {
    let ca = tempfile::tempdir().unwrap();
    magicmx::gossip::ca::init(ca.path()).unwrap();
    magicmx::gossip::ca::issue("node1", ca.path()).unwrap();
    let keys = ca.path().join("network_keys");
    let text = std::fs::read_to_string(&keys).unwrap();
    let node1 = text.split_whitespace().next().unwrap().to_string();
    let config = format!(
        "{POLICY_CONFIG}network_keys = {:?}\n",
        keys.display().to_string()
    );
    let (_p, addr) = Process::start(&["policy"], &config);
    let mut pf = Postfix::connect(addr).await;
    assert_eq!(pf.ask_with_key("127.0.82.1", &node1).await, "DUNNO");
    assert_eq!(
        pf.ask_with_key("127.0.83.1", &node1.to_lowercase().replace(':', ""))
            .await,
        "DUNNO"
    );
    let other = magicmx::netkeys::format(&[0x5a; 32]);
    assert!(is_polite(&pf.ask_with_key("127.0.84.1", &other).await));
    assert!(is_polite(&pf.ask("127.0.84.2").await));
    assert!(is_reject(&pf.ask_with_key("127.0.84.3", &other).await));
    // Addresses in magic_nodes keep working.
    assert_eq!(pf.ask_with_key("127.0.20.1", &other).await, "DUNNO");
}

/// A `network_keys` file that cannot be read stops `magicmx policy` at
/// start, naming the key.
#[test]
fn magicmx_policy_refuses_a_missing_network_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let config = format!("{POLICY_CONFIG}network_keys = \"no-such-file\"\n")
        .replace("DATA_DIR", &dir.path().join("data").display().to_string());
    std::fs::write(&path, config).unwrap();
    let out = Command::new(common::node::BIN)
        .args(["policy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.network_keys") && err.contains("no-such-file"),
        "{err}"
    );
}
