//! Interop with real Postfix (Debian's package), in the three roles around a
//! magicmx network, plus the zone tools against dnsmasq:
//!
//! 1. Postfix as the domain's real MX, protected by `magicmx policy`
//!    (`check_policy_service`): direct mail from an untrusted network is
//!    deferred for the polite attempts, then rejected; mail relayed by a
//!    magic node lands in Postfix's mailbox.
//! 2. Postfix as an unknown sending MTA that follows the published MX
//!    records (magic MX first): its message reaches the real MX through the
//!    node.
//! 3. Postfix as a trusted site using the node's outbound listener as its
//!    relayhost: delivered straight to the real MX, the magic host is never
//!    contacted; a sender not listed in `[outbound] clients` is refused.
//! 4. `magicmx zone` output loaded into dnsmasq; `magicmx check-domain`
//!    (with `--probe` against the Postfix of role 1) reports correctly.
//! 5. Postfix as a real MX that knows its users (`relay_recipient_maps`):
//!    the node verifies recipients with it at RCPT (`[verify]`).
//!
//! Every Postfix is a private instance: its own `config_directory`,
//! `queue_directory`, `data_directory` and `maillog_file` in a temporary
//! directory, `chroot` off, SMTP on a free port of a loopback address,
//! started with `postfix -c DIR start` and stopped (master killed if need
//! be) when the test ends, failed or not. That needs root (Postfix drops to
//! its `postfix` user itself); without root these tests fail, never skip.
//!
//! How Postfix resolves through the test DNS: Postfix's SMTP client looks MX
//! records up with the system resolver, which reads `/etc/resolv.conf` and
//! only speaks to port 53. So the sending Postfix of role 2 is started in
//! its own mount namespace (`unshare --mount`) where a private resolv.conf
//! is bind-mounted over `/etc/resolv.conf`, naming a dnsmasq that listens on
//! port 53 of a loopback address used by nothing else (`127.53.x.y`, picked
//! per test run). The network namespace stays shared, so Postfix still
//! reaches the node and the sinks on loopback, and nothing global changes:
//! the bind mount disappears with the namespace when Postfix stops.
//! `smtp_tcp_port` points Postfix's SMTP client at the node's port instead
//! of 25.
#![cfg(feature = "interop")]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::node::BIN;
use common::{send_mail, simple_message, Client, DnsServer, Rec, Sink};

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// Postfix must be started by root, with its tools installed.
fn require_root_and_tools(test: &str) {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    // Not a skip: with the interop feature on, a test that cannot run fails.
    assert!(
        root,
        "{test}: a private Postfix instance needs root (run the interop tests as root, as .ci/run does)"
    );
    for tool in ["postfix", "dnsmasq", "unshare"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is not installed (see .ci/run)");
    }
}

/// A TCP port that was free on `ip` a moment ago.
fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// A port free for both UDP and TCP on `ip` (for a DNS server).
fn free_dns_port(ip: IpAddr) -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind((ip, 0)).expect("bind UDP");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for UDP and TCP on {ip}");
}

/// Lines collected from a child's stderr (and stdout).
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn pump(&self, r: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A `magicmx` process run from a TOML text (`DATA_DIR` is replaced).
struct Magicmx {
    child: Child,
    logs: Lines,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Magicmx {
    fn start(args: &[&str], toml: &str) -> Magicmx {
        let dir = tempfile::Builder::new()
            .prefix("magicmx-interop-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("node.toml");
        let data = dir.path().join("data");
        std::fs::write(&config, toml.replace("DATA_DIR", data.to_str().unwrap())).unwrap();
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("MAGICMX_LOG", "info,magicmx=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let logs = Lines::default();
        logs.pump(child.stderr.take().unwrap());
        logs.pump(child.stdout.take().unwrap());
        Magicmx {
            child,
            logs,
            config,
            _dir: dir,
        }
    }

    /// The address logged as `<what> listening addr=IP:PORT`.
    fn addr(&mut self, what: &str) -> SocketAddr {
        let marker = format!("{what} listening");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.logs.all().iter().find_map(|l| {
                let rest = &l[l.find(&marker)?..];
                let v = &rest[rest.find("addr=")? + 5..];
                v.split_whitespace().next()?.trim_matches('"').parse().ok()
            });
            if let Some(a) = found {
                return a;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(200));
                panic!(
                    "magicmx exited with {status}:\n{}",
                    self.logs.all().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{marker}` line:\n{}",
                self.logs.all().join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_lines_with(&self, words: &[&str]) -> Vec<String> {
        self.logs
            .all()
            .into_iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .collect()
    }
}

impl Drop for Magicmx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            thread::sleep(Duration::from_millis(100));
            eprintln!(
                "--- magicmx {} logs:\n{}\n---",
                self.config.display(),
                self.logs.all().join("\n")
            );
        }
    }
}

/// dnsmasq serving fixed records (`mx-host=`, `host-record=`) from a
/// `--conf-file`, authoritative for `test.` (NXDOMAIN for unknown names),
/// never forwarding anywhere.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    logs: Lines,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    fn start(addr: SocketAddr, conf: &[String]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let conf_file = dir.path().join("dnsmasq.conf");
        std::fs::write(&conf_file, conf.join("\n") + "\n").unwrap();
        let mut child = Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf_file.display()))
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-poll")
            .arg("--local=/test/")
            .arg(format!("--listen-address={}", addr.ip()))
            .arg("--bind-interfaces")
            .arg(format!("--port={}", addr.port()))
            .arg("--pid-file=")
            .arg("--user=root")
            .arg("--log-queries")
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq");
        let logs = Lines::default();
        logs.pump(child.stderr.take().unwrap());
        logs.pump(child.stdout.take().unwrap());
        let mut d = Dnsmasq {
            child,
            addr,
            logs,
            _dir: dir,
        };
        d.wait_ready();
        d
    }

    /// Sends a query until dnsmasq answers.
    fn wait_ready(&mut self) {
        // ID 0x4242, RD, one question: ready.test A IN.
        let mut q = vec![0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["ready", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            let _ = sock.send_to(&q, self.addr);
            if matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x42, 0x42])
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "dnsmasq exited with {status}:\n{}",
                    self.logs.all().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq does not answer on {}:\n{}",
                self.addr,
                self.logs.all().join("\n")
            );
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- dnsmasq {} log:\n{}\n---",
                self.addr,
                self.logs.all().join("\n")
            );
        }
    }
}

/// A loopback address with port 53 free, for a dnsmasq the system resolver
/// of a namespaced Postfix can use. Distinct per process and call.
fn dns53_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    for _ in 0..64 {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let ip = IpAddr::from([127, 53, (pid % 251) as u8 + 1, (n % 250) as u8 + 1]);
        if UdpSocket::bind((ip, 53)).is_ok() && TcpListener::bind((ip, 53)).is_ok() {
            return SocketAddr::new(ip, 53);
        }
    }
    panic!("no loopback address with port 53 free");
}

/// How a private Postfix instance is set up.
struct PostfixConf {
    /// `myhostname`.
    hostname: String,
    /// SMTP server address (`inet_interfaces` is its IP).
    smtpd: SocketAddr,
    /// Extra `main.cf` lines.
    main: Vec<String>,
    /// Extra `master.cf` lines.
    master: Vec<String>,
    /// Start in a mount namespace whose resolv.conf names this server.
    resolver: Option<IpAddr>,
    /// Deliver this domain into `mail/mbox` (virtual mailbox).
    mailbox_domain: Option<String>,
}

impl PostfixConf {
    fn new(hostname: &str) -> PostfixConf {
        PostfixConf {
            hostname: hostname.into(),
            smtpd: SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")),
            main: Vec::new(),
            master: Vec::new(),
            resolver: None,
            mailbox_domain: None,
        }
    }

    fn main(mut self, line: impl Into<String>) -> Self {
        self.main.push(line.into());
        self
    }

    fn master(mut self, line: impl Into<String>) -> Self {
        self.master.push(line.into());
        self
    }
}

/// The services of Debian's master.cf, without chroot.
const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

fn id(flag: &str, name: &str) -> String {
    let out = Command::new("id").args([flag, name]).output().expect("id");
    assert!(
        out.status.success(),
        "user {name} missing: is postfix installed?"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running private Postfix instance.
struct Postfix {
    dir: tempfile::TempDir,
    smtpd: SocketAddr,
    master_pid: Option<u32>,
}

impl Postfix {
    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn start(conf: PostfixConf) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("magicmx-postfix-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        // Postfix's delivery agents run as `postfix` and must reach mail/.
        Command::new("chmod").arg("755").arg(d).status().unwrap();
        for sub in ["etc", "queue", "data", "mail"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let chown = |what: &str, path: &Path| {
            let ok = Command::new("chown").arg(what).arg(path).status().unwrap();
            assert!(ok.success(), "chown {what} {}", path.display());
        };
        chown("postfix:postfix", &d.join("data"));
        chown("postfix:postfix", &d.join("mail"));
        let (uid, gid) = (id("-u", "postfix"), id("-g", "postfix"));
        let mut main = vec![
            "compatibility_level = 3.6".to_string(),
            format!("queue_directory = {}", d.join("queue").display()),
            format!("data_directory = {}", d.join("data").display()),
            "mail_owner = postfix".into(),
            "setgid_group = postdrop".into(),
            format!("myhostname = {}", conf.hostname),
            format!("inet_interfaces = {}", conf.smtpd.ip()),
            "inet_protocols = ipv4".into(),
            "mydestination =".into(),
            "alias_maps =".into(),
            "alias_database =".into(),
            "biff = no".into(),
            "smtputf8_enable = no".into(),
            // No reverse lookups of test clients through the host's DNS.
            "smtpd_peername_lookup = no".into(),
            format!("maillog_file = {}", d.join("maillog").display()),
            format!("maillog_file_prefixes = {}", d.display()),
            // Retry soon if a test makes Postfix defer.
            "queue_run_delay = 2s".into(),
            "minimal_backoff_time = 2s".into(),
            "maximal_backoff_time = 4s".into(),
        ];
        if conf.mailbox_domain.is_some() {
            // Every recipient of the domain lands in mail/mbox.
            main.extend([
                format!("virtual_mailbox_base = {}", d.join("mail").display()),
                "virtual_mailbox_maps = static:mbox".into(),
                format!("virtual_uid_maps = static:{uid}"),
                format!("virtual_gid_maps = static:{gid}"),
            ]);
        }
        if let Some(domain) = &conf.mailbox_domain {
            main.push(format!("virtual_mailbox_domains = {domain}"));
        }
        main.extend(conf.main.iter().cloned());
        std::fs::write(d.join("etc/main.cf"), main.join("\n") + "\n").unwrap();
        let mut master = format!(
            "{}:{} inet n - n - - smtpd\n",
            conf.smtpd.ip(),
            conf.smtpd.port()
        );
        master += MASTER_CF;
        for l in &conf.master {
            master += l;
            master += "\n";
        }
        std::fs::write(d.join("etc/master.cf"), master).unwrap();

        let etc = d.join("etc");
        let out = match conf.resolver {
            None => Command::new("postfix")
                .arg("-c")
                .arg(&etc)
                .arg("start")
                .output(),
            Some(ns) => {
                let resolv = d.join("resolv.conf");
                std::fs::write(
                    &resolv,
                    format!("nameserver {ns}\noptions timeout:2 attempts:2\n"),
                )
                .unwrap();
                Command::new("unshare")
                    .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg("mount --bind \"$1\" /etc/resolv.conf && exec postfix -c \"$2\" start")
                    .arg("sh")
                    .arg(&resolv)
                    .arg(&etc)
                    .output()
            }
        }
        .expect("run postfix start");
        let mut pf = Postfix {
            dir,
            smtpd: conf.smtpd,
            master_pid: None,
        };
        assert!(
            out.status.success(),
            "postfix start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            pf.log()
        );
        pf.master_pid = std::fs::read_to_string(pf.dir.path().join("queue/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // Ready when smtpd answers.
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect_timeout(&pf.smtpd, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Postfix does not listen on {}:\n{}",
                pf.smtpd,
                pf.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        pf
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Waits for a maillog line containing every one of `words`.
    fn wait_log(&self, words: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .log()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no Postfix log line with {words:?} within {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The mbox of the virtual mailbox domain.
    fn mailbox(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mail/mbox")).unwrap_or_default()
    }

    fn wait_mailbox(&self, word: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.mailbox();
            if m.contains(word) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{word:?} not in the mailbox within {timeout:?}; mailbox:\n{m}\nlog:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.etc())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.master_pid {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc_dir.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if proc_dir.exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        if thread::panicking() {
            eprintln!("--- Postfix {} maillog:\n{}\n---", self.smtpd, self.log());
        }
    }
}

/// The `magicmx policy` config: `magic_nodes` and trusted networks given.
fn policy_toml(magic_nodes: &str, trusted: &str) -> String {
    format!(
        r#"
[node]
name = "realmx"
hostname = "mail.example.test"
data_dir = "DATA_DIR"

[trust]
networks = [{trusted}]

[policy]
listen = "127.0.0.1:0"
magic_nodes = [{magic_nodes}]
polite_refusals = 3
polite_period = "1h"
"#
    )
}

/// Postfix as the real MX of example.test, asking `policy` at RCPT.
/// `mynetworks` is unrelated, so only the policy service lets anyone in.
fn real_mx(policy: SocketAddr) -> Postfix {
    Postfix::start(PostfixConf {
        mailbox_domain: Some("example.test".into()),
        ..PostfixConf::new("mail.example.test")
            .main("mynetworks = 192.0.2.1/32")
            .main(format!(
                "smtpd_recipient_restrictions = check_policy_service inet:{policy}, \
                 reject_unauth_destination"
            ))
    })
}

/// A node config: `listen` for SMTP, relaying on `relay_port`, resolving
/// through `dns`, plus extra TOML.
fn node_toml(listen: &str, relay_port: u16, dns: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[node]
name = "interop"
hostname = "mx1.magic.test"
data_dir = "DATA_DIR"
magic_suffixes = [".magic.test"]

[smtp]
listen = ["{listen}"]

[accept]
domains = ["example.test"]

[relay]
port = {relay_port}
# Everything here is on loopback.
deny_networks = []
retry_initial = "1s"
retry_max = "2s"
tls = "none"

[throttle]
hold = "100ms"

[dns]
nameservers = ["{dns}"]
timeout = "2s"
{extra}
"#
    )
}

fn rcpt_from(source: &str, server: SocketAddr, rcpt: &str) -> common::Reply {
    let mut c = Client::connect_from(source, server);
    c.ehlo("direct.sender.test");
    c.expect("MAIL FROM:<alice@sender.test>", 250);
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    let _ = c.try_send(b"QUIT\r\n");
    r
}

// ------------------------------------------------------------------ tests

/// Must show 1: the real MX refuses untrusted direct senders, politely
/// first, and takes mail relayed by a magic node.
#[test]
fn postfix_real_mx_with_policy_service() {
    require_root_and_tools("postfix_real_mx_with_policy_service");
    let t0 = Instant::now();
    // The node relays from 127.0.0.1 (the kernel's source for loopback).
    let mut policy = Magicmx::start(
        &["policy"],
        &policy_toml("\"127.0.0.1/32\"", "\"127.0.160.0/24\""),
    );
    let policy_addr = policy.addr("policy");
    let pf = real_mx(policy_addr);

    // An untrusted network bypassing the magic MX: 3 polite deferrals, then
    // rejection; each from a different address of the same /24 block.
    for i in 1..=3 {
        let r = rcpt_from(&format!("127.0.161.{i}"), pf.smtpd, "bob@example.test");
        assert_eq!(r.code, 450, "attempt {i}: {r}");
        assert!(
            r.text().contains("4.7.1") && r.text().contains("published MX"),
            "{r}"
        );
    }
    let r = rcpt_from("127.0.161.4", pf.smtpd, "bob@example.test");
    assert_eq!(r.class(), 5, "{r}");
    assert!(r.text().contains("5.7.1"), "{r}");
    pf.wait_log(&["reject: RCPT from", "127.0.161.4", "5.7.1"], WAIT);
    // Another untrusted block starts polite again.
    assert_eq!(
        rcpt_from("127.0.162.1", pf.smtpd, "bob@example.test").code,
        450
    );
    // A trusted network delivers directly.
    let mut c = Client::connect_from("127.0.160.5", pf.smtpd);
    c.ehlo("trusted.sender.test");
    let r = common::client::transaction(
        &mut c,
        "alice@trusted.test",
        &["bob@example.test"],
        &simple_message("alice@trusted.test", "bob@example.test", "trusted-direct"),
    );
    assert_eq!(r.code, 250, "{r}");
    pf.wait_mailbox("Subject: trusted-direct", WAIT);

    // A magic node takes mail from an unknown sender and relays it to the
    // real MX, which accepts it because the node is a listed magic node.
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "mail.example.test"),
        Rec::A("mx1.magic.test", "127.0.0.1"),
        Rec::A("mail.example.test", "127.0.0.1"),
    ]);
    let mut node = Magicmx::start(
        &["run"],
        &node_toml("127.0.0.1:0", pf.smtpd.port(), dns.addr, ""),
    );
    let smtp = node.addr("smtp");
    let mut c = Client::connect_from("127.0.163.1", smtp);
    c.ehlo("unknown.sender.test");
    let r = common::client::transaction(
        &mut c,
        "carol@unknown.test",
        &["bob@example.test"],
        &simple_message("carol@unknown.test", "bob@example.test", "via-magic-node"),
    );
    assert_eq!(r.code, 250, "{r}");
    let mbox = pf.wait_mailbox("Subject: via-magic-node", WAIT);
    assert!(
        mbox.contains("by mx1.magic.test"),
        "the node's Received: header:\n{mbox}"
    );
    pf.wait_log(
        &["to=<bob@example.test>", "relay=virtual", "status=sent"],
        WAIT,
    );

    // The policy service logged its decisions.
    assert_eq!(
        policy
            .log_lines_with(&["policy decision", "defer_if_permit"])
            .len(),
        4
    );
    assert_eq!(
        policy
            .log_lines_with(&["policy decision", "reject", "client=\"127.0.161.4\""])
            .len(),
        1
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}

/// Issue 13, must show 1: Postfix as a real MX that knows its users
/// (`relay_recipient_maps`). The node verifies recipients with it at RCPT:
/// an unknown user gets `550 5.1.1` from the node itself, nothing is
/// accepted for it and no DSN is made; a known user is relayed.
#[test]
fn postfix_relay_recipient_maps_are_verified_at_rcpt() {
    require_root_and_tools("postfix_relay_recipient_maps_are_verified_at_rcpt");
    // Postfix relays example.test for the users it lists, to a sink.
    let inner = Sink::start("127.0.0.1");
    let pf = Postfix::start(
        PostfixConf::new("mail.example.test")
            .main("mynetworks = 127.0.0.0/8")
            .main("relay_domains = example.test")
            .main("relay_recipient_maps = inline:{ bob@example.test=ok }")
            .main(format!(
                "relay_transport = smtp:[127.0.0.1]:{}",
                inner.addr.port()
            ))
            .main("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination"),
    );
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "mail.example.test"),
        Rec::A("mx1.magic.test", "127.0.0.1"),
        Rec::A("mail.example.test", "127.0.0.1"),
    ]);
    let mut node = Magicmx::start(
        &["run"],
        &node_toml(
            "127.0.0.1:0",
            pf.smtpd.port(),
            dns.addr,
            "[verify]\nenabled = true\ntimeout = \"10s\"\n",
        ),
    );
    let smtp = node.addr("smtp");
    let mut c = Client::connect_from("127.0.164.1", smtp);
    c.ehlo("unknown.sender.test");
    c.expect("MAIL FROM:<carol@unknown.test>", 250);
    let r = c.cmd("RCPT TO:<nobody@example.test>");
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().starts_with("5.1.1"), "{r}");
    let r = c.cmd("RCPT TO:<bob@example.test>");
    assert_eq!(r.code, 250, "{r}");
    c.expect("DATA", 354);
    c.send(&common::client::data_transfer(&simple_message(
        "carol@unknown.test",
        "bob@example.test",
        "verified-by-postfix",
    )));
    assert_eq!(c.reply().code, 250);
    let _ = c.try_send(b"QUIT\r\n");
    // Postfix refused the probe for the unknown user, from its table.
    pf.wait_log(
        &[
            "NOQUEUE: reject: RCPT from",
            "<nobody@example.test>",
            "relay recipient table",
        ],
        WAIT,
    );
    // The known user's message went through Postfix to the final sink.
    let got = inner.wait_messages(1, WAIT);
    assert!(
        got[0].rcpts.iter().any(|r| r == "bob@example.test"),
        "{:?}",
        got[0].rcpts
    );
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: verified-by-postfix"));
    // Nothing for the unknown user reached Postfix's queue, and no DSN was
    // made: the node's queue drains (a DSN would sit in it, its sender's
    // domain has no MX) and nothing else arrives at the sink.
    let listing = || {
        let out = Command::new(BIN)
            .args(["queue", "list", "--config"])
            .arg(&node.config)
            .output()
            .expect("magicmx queue list");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        common::wait_until(WAIT, || listing().contains("\n0 message(s)")),
        "the node's queue did not drain:\n{}",
        listing()
    );
    assert_eq!(inner.messages().len(), 1, "{:?}", inner.messages());
    let log = pf.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("to=<nobody@example.test>") && l.contains("status=")),
        "{log}"
    );
    assert!(
        node.log_lines_with(&["bounced"]).is_empty(),
        "a recipient bounced"
    );
    assert!(
        inner.messages().iter().all(|t| !t.mail_from.is_empty()),
        "a DSN"
    );
}

/// `magicmx ca ARGS...` (the binary, as an operator runs it).
fn magicmx_ca(args: &[&str]) {
    let out = Command::new(BIN).arg("ca").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "magicmx ca {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// swaks to `server` from `source` up to RCPT (STARTTLS required, plus
/// `extra`); returns the reply line to RCPT and the transcript.
fn swaks_rcpt(server: SocketAddr, source: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new("swaks")
        .args(["--server", &server.ip().to_string()])
        .args(["--port", &server.port().to_string()])
        .args(["--local-interface", source])
        .args([
            "--from",
            "mallory@stranger.test",
            "--to",
            "bob@example.test",
        ])
        .args(["--ehlo", "stranger.test", "--tls", "--quit-after", "RCPT"])
        .args(["--timeout", "20"])
        .args(extra)
        .output()
        .expect("run swaks (is it installed? see .ci/run)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines().map(str::trim);
    let reply = lines
        .find(|l| l.contains("> RCPT TO:"))
        .and_then(|_| lines.find(|l| l.starts_with('<')))
        .unwrap_or_else(|| panic!("no reply to RCPT in swaks' transcript:\n{text}"))
        .to_string();
    (reply, text)
}

/// Issue 14, must show 1: Postfix as the real MX asks for client
/// certificates (`smtpd_tls_ask_ccert = yes`) and asks `magicmx policy`,
/// which has no `magic_nodes` and no trusted network, only the network's
/// pinned keys (`[policy] network_keys`, written by `magicmx ca issue`).
/// Mail relayed by a node with its CA-issued certificate is accepted
/// because of the certificate; a client with a certificate from another CA
/// and one with none are deferred, then rejected, as strangers.
#[test]
fn postfix_real_mx_lets_nodes_in_by_client_certificate() {
    require_root_and_tools("postfix_real_mx_lets_nodes_in_by_client_certificate");
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("magicmx-ccert-")
        .tempdir()
        .unwrap();
    let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other-ca"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    magicmx_ca(&["init", "--dir", &path(&ca)]);
    magicmx_ca(&["issue", "interop", "--dir", &path(&ca)]);
    magicmx_ca(&["init", "--dir", &path(&other_ca)]);
    magicmx_ca(&["issue", "intruder", "--dir", &path(&other_ca)]);
    let keys = ca.join("network_keys");
    assert!(
        std::fs::read_to_string(&keys).unwrap().contains(" interop"),
        "ca issue lists the node's key"
    );

    let mut policy = Magicmx::start(
        &["policy"],
        &format!(
            r#"
[node]
name = "realmx"
hostname = "mail.example.test"
data_dir = "DATA_DIR"

[policy]
listen = "127.0.0.1:0"
network_keys = {keys:?}
polite_refusals = 1
polite_period = "1h"
"#,
            keys = path(&keys)
        ),
    );
    let policy_addr = policy.addr("policy");
    let mx_tls = common::tls::generate(dir.path(), "mx", &["mail.example.test"]);
    let pf = Postfix::start(PostfixConf {
        mailbox_domain: Some("example.test".into()),
        ..PostfixConf::new("mail.example.test")
            .main("mynetworks = 192.0.2.1/32")
            .main("smtpd_tls_security_level = may")
            .main(format!("smtpd_tls_cert_file = {}", mx_tls.cert.display()))
            .main(format!("smtpd_tls_key_file = {}", mx_tls.key.display()))
            .main("smtpd_tls_ask_ccert = yes")
            .main("smtpd_tls_fingerprint_digest = sha256")
            .main("smtpd_tls_loglevel = 1")
            .main(format!(
                "smtpd_recipient_restrictions = check_policy_service inet:{policy_addr}, \
                 reject_unauth_destination"
            ))
    });

    // Strangers, each from its own /24 block: a certificate from another
    // CA, then none (TLS without a certificate), then plain text.
    let intruder_cert = path(&other_ca.join("intruder.pem"));
    let intruder_key = path(&other_ca.join("intruder.key"));
    let with_foreign_cert = ["--tls-cert", &intruder_cert, "--tls-key", &intruder_key];
    for (source, extra) in [
        (["127.0.181.1", "127.0.181.2"], &with_foreign_cert[..]),
        (["127.0.182.1", "127.0.182.2"], &[][..]),
    ] {
        let (first, t) = swaks_rcpt(pf.smtpd, source[0], extra);
        assert!(first.contains("450 4.7.1"), "{first}\n{t}");
        assert!(first.contains("published MX"), "{first}");
        let (second, t) = swaks_rcpt(pf.smtpd, source[1], extra);
        assert!(second.contains(" 5.7.1"), "{second}\n{t}");
        assert!(
            second.starts_with("<** 5") || second.starts_with("<~* 5"),
            "{second}"
        );
    }
    let foreign = pf.wait_log(&["TLS connection established from", "127.0.181.1"], WAIT);
    assert!(
        foreign.contains("client-signature"),
        "swaks presented its certificate: {foreign}"
    );
    let bare = pf.wait_log(&["TLS connection established from", "127.0.182.1"], WAIT);
    assert!(!bare.contains("client-signature"), "{bare}");
    assert_eq!(
        rcpt_from("127.0.183.1", pf.smtpd, "bob@example.test").code,
        450
    );
    assert_eq!(
        rcpt_from("127.0.183.2", pf.smtpd, "bob@example.test").class(),
        5
    );

    // A node with the CA's certificate relays (from 127.0.0.1, in no list):
    // STARTTLS, its certificate, accepted.
    let dns = DnsServer::start(&[
        Rec::Mx("example.test", 10, "mx1.magic.test"),
        Rec::Mx("example.test", 20, "mail.example.test"),
        Rec::A("mx1.magic.test", "127.0.0.1"),
        Rec::A("mail.example.test", "127.0.0.1"),
    ]);
    let gossip = format!(
        r#"
[gossip]
enabled = true
listen = "127.0.0.1:0"
network = "interop"
ca = {ca:?}
cert = {cert:?}
key = {key:?}
"#,
        ca = path(&ca.join("ca.pem")),
        cert = path(&ca.join("interop.pem")),
        key = path(&ca.join("interop.key")),
    );
    let mut node = Magicmx::start(
        &["run"],
        &node_toml("127.0.0.1:0", pf.smtpd.port(), dns.addr, &gossip)
            .replace("tls = \"none\"", "tls = \"opportunistic\""),
    );
    let smtp = node.addr("smtp");
    let mut c = Client::connect_from("127.0.184.1", smtp);
    c.ehlo("unknown.sender.test");
    let r = common::client::transaction(
        &mut c,
        "carol@unknown.test",
        &["bob@example.test"],
        &simple_message("carol@unknown.test", "bob@example.test", "by-certificate"),
    );
    assert_eq!(r.code, 250, "{r}");
    pf.wait_mailbox("Subject: by-certificate", WAIT);
    let tls = pf.wait_log(&["TLS connection established from", "[127.0.0.1]"], WAIT);
    assert!(tls.contains("client-signature"), "{tls}");
    let matched = policy.log_lines_with(&["certificate's key belongs to the network"]);
    assert!(
        matched.iter().any(|l| l.contains("interop")),
        "{matched:?}\n{}",
        policy.logs.all().join("\n")
    );
    // No deferral on the way: the node's first attempt was accepted.
    assert!(
        node.log_lines_with(&["4.7.1"]).is_empty(),
        "{:?}",
        node.log_lines_with(&["4.7.1"])
    );
    // Refusals: exactly the strangers' (3 blocks, one of each).
    assert_eq!(
        policy
            .log_lines_with(&["policy decision", "defer_if_permit"])
            .len(),
        3
    );
    assert_eq!(
        policy
            .log_lines_with(&["policy decision", "action=\"reject\""])
            .len(),
        3
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}

/// Must show 2: an unknown sending MTA follows the MX records to the magic
/// node, and the node relays to the real MX.
#[test]
fn postfix_sender_follows_magic_mx() {
    require_root_and_tools("postfix_sender_follows_magic_mx");
    let t0 = Instant::now();
    let real = Sink::start("127.0.171.1");
    let ns = dns53_addr();
    let dns = Dnsmasq::start(
        ns,
        &[
            "mx-host=example.test,mx1.magic.test,10".into(),
            "mx-host=example.test,mail.example.test,20".into(),
            "host-record=mx1.magic.test,127.0.170.1".into(),
            "host-record=mail.example.test,127.0.171.1".into(),
        ],
    );
    let mut node = Magicmx::start(
        &["run"],
        &node_toml("127.0.170.1:0", real.addr.port(), ns, ""),
    );
    let smtp = node.addr("smtp");
    let sender = Postfix::start(PostfixConf {
        resolver: Some(ns.ip()),
        ..PostfixConf::new("mta.sender.test")
            .main("mynetworks = 127.0.0.1/32")
            .main("smtp_host_lookup = dns")
            .main(format!("smtp_tcp_port = {}", smtp.port()))
            // An unknown network from the node's point of view.
            .main("smtp_bind_address = 127.0.172.1")
    });
    let r = send_mail(
        sender.smtpd,
        "alice@sender.test",
        &["bob@example.test"],
        &simple_message("alice@sender.test", "bob@example.test", "follows-mx"),
    );
    assert_eq!(r.code, 250, "{r}");
    let line = sender.wait_log(&["to=<bob@example.test>", "status=sent"], WAIT);
    assert!(line.contains("relay=mx1.magic.test[127.0.170.1]"), "{line}");
    let got = real.wait_messages(1, WAIT);
    assert!(
        got[0].text().contains("Subject: follows-mx"),
        "{:?}",
        got[0]
    );
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    // The node saw Postfix's address, and Postfix saw the DNS server.
    assert!(
        !node.log_lines_with(&["127.0.172.1"]).is_empty(),
        "node logs name the client"
    );
    assert!(
        dns.logs
            .all()
            .iter()
            .any(|l| l.contains("query[MX] example.test from")),
        "Postfix asked dnsmasq"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}

/// Greylisting (issue 12, must show 1): Postfix as an unknown sender
/// following the magic MX is greylisted at its first attempt (`451 4.7.1`),
/// defers, retries after its short backoff and is accepted and relayed; a
/// client that never retries never gets through.
#[test]
fn postfix_sender_retries_past_greylisting() {
    require_root_and_tools("postfix_sender_retries_past_greylisting");
    let real = Sink::start("127.0.181.1");
    let ns = dns53_addr();
    let dns = Dnsmasq::start(
        ns,
        &[
            "mx-host=example.test,mx1.magic.test,10".into(),
            "mx-host=example.test,mail.example.test,20".into(),
            "host-record=mx1.magic.test,127.0.180.1".into(),
            "host-record=mail.example.test,127.0.181.1".into(),
        ],
    );
    let mut node = Magicmx::start(
        &["run"],
        &node_toml(
            "127.0.180.1:0",
            real.addr.port(),
            ns,
            "[greylist]\nenabled = true\nmode = \"unknown\"\ndelay = \"1s\"\n",
        ),
    );
    let smtp = node.addr("smtp");
    let sender = Postfix::start(PostfixConf {
        resolver: Some(ns.ip()),
        ..PostfixConf::new("mta.sender.test")
            .main("mynetworks = 127.0.0.1/32")
            .main("smtp_host_lookup = dns")
            .main(format!("smtp_tcp_port = {}", smtp.port()))
            // Only the magic MX: the retry must come back to it.
            .main("smtp_bind_address = 127.0.182.1")
    });
    let r = send_mail(
        sender.smtpd,
        "alice@sender.test",
        &["bob@example.test"],
        &simple_message("alice@sender.test", "bob@example.test", "greylisted"),
    );
    assert_eq!(r.code, 250, "{r}");
    // A spam client that gives up after the 451.
    let once = rcpt_from("127.0.183.1", smtp, "carol@example.test");
    assert_eq!(once.code, 451, "{once}");
    // Deferred after the 451 (Postfix then tries the next MX too, which
    // refuses the connection here, and logs that last error).
    sender.wait_log(&["to=<bob@example.test>", "status=deferred"], WAIT);
    let line = sender.wait_log(&["to=<bob@example.test>", "status=sent"], WAIT);
    assert!(line.contains("relay=mx1.magic.test[127.0.180.1]"), "{line}");
    let got = real.wait_messages(1, WAIT);
    assert!(
        got[0].text().contains("Subject: greylisted"),
        "{:?}",
        got[0]
    );
    assert!(
        !node
            .log_lines_with(&["greylisted", "127.0.182.1"])
            .is_empty(),
        "the first attempt was greylisted"
    );
    assert!(
        !node
            .log_lines_with(&["greylisting passed", "127.0.182.1"])
            .is_empty(),
        "the retry passed"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        real.messages()
            .iter()
            .all(|t| !t.rcpts.iter().any(|r| r == "carol@example.test")),
        "the client that never retried got through"
    );
    drop(dns);
}

/// Must show 3: a trusted site relays through the node's outbound listener
/// straight to the real MX; an unlisted client is refused.
#[test]
fn trusted_postfix_uses_outbound_relayhost() {
    require_root_and_tools("trusted_postfix_uses_outbound_relayhost");
    let t0 = Instant::now();
    let (real, magic) = Sink::pair_same_port(
        ("127.0.181.1", Sink::builder()),
        ("127.0.181.2", Sink::builder()),
    );
    let dns = DnsServer::start(&[
        Rec::Mx("dest.test", 10, "mx1.magic.test"),
        Rec::Mx("dest.test", 20, "mail.dest.test"),
        Rec::Mx("other.test", 10, "mx1.magic.test"),
        Rec::Mx("other.test", 20, "mail.dest.test"),
        Rec::A("mx1.magic.test", "127.0.181.2"),
        Rec::A("mail.dest.test", "127.0.181.1"),
    ]);
    let outbound = "\n[outbound]\nlisten = [\"127.0.0.1:0\"]\nclients = [\"127.0.180.0/24\"]\n";
    let mut node = Magicmx::start(
        &["run"],
        &node_toml("127.0.0.1:0", real.addr.port(), dns.addr, outbound),
    );
    let out = node.addr("outbound");
    let site = Postfix::start(
        PostfixConf::new("mta.trusted.test")
            .main("mynetworks = 127.0.0.1/32")
            .main(format!("relayhost = [{}]:{}", out.ip(), out.port()))
            .main("smtp_bind_address = 127.0.180.1")
            // Mail for other.test leaves from an address not in [outbound] clients.
            .main(format!(
                "transport_maps = inline:{{ other.test=unlisted:[{}]:{} }}",
                out.ip(),
                out.port()
            ))
            .master("unlisted  unix  -       -       n       -       -       smtp -o smtp_bind_address=127.0.182.1"),
    );
    let r = send_mail(
        site.smtpd,
        "alice@trusted.test",
        &["bob@dest.test"],
        &simple_message("alice@trusted.test", "bob@dest.test", "trusted-outbound"),
    );
    assert_eq!(r.code, 250, "{r}");
    let got = real.wait_messages(1, WAIT);
    assert!(got[0].text().contains("Subject: trusted-outbound"));
    let line = site.wait_log(&["to=<bob@dest.test>", "status=sent"], WAIT);
    assert!(
        line.contains(&format!("relay={}[{}]:{}", out.ip(), out.ip(), out.port())),
        "{line}"
    );

    // From an unlisted address, through the real Postfix: 550 and a bounce.
    // (Null sender, so the bounce goes nowhere.)
    let r = send_mail(
        site.smtpd,
        "",
        &["carol@other.test"],
        &simple_message("nobody@trusted.test", "carol@other.test", "unlisted"),
    );
    assert_eq!(r.code, 250, "{r}");
    let line = site.wait_log(&["to=<carol@other.test>", "status=bounced"], WAIT);
    assert!(line.contains("550 5.7.1"), "{line}");
    // And directly, from another unlisted address.
    let r = rcpt_from("127.0.183.1", out, "dave@dest.test");
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().contains("5.7.1"), "{r}");

    // Nothing ever reached the magic host, and only one message the real MX.
    thread::sleep(Duration::from_millis(500));
    assert!(
        magic.connections().is_empty(),
        "the magic host was contacted"
    );
    assert_eq!(real.messages().len(), 1);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}

/// Must show 4: `magicmx zone` output served by dnsmasq; `check-domain`
/// reads it back, and `--probe` finds the Postfix real MX protected.
#[test]
fn zone_in_dnsmasq_and_check_domain_probe() {
    require_root_and_tools("zone_in_dnsmasq_and_check_domain_probe");
    let t0 = Instant::now();
    // The probe leaves from 127.0.0.1: not a magic node here, not trusted.
    let mut policy = Magicmx::start(&["policy"], &policy_toml("\"127.0.0.2/32\"", ""));
    let pf = real_mx(policy.addr("policy"));

    let zone = Command::new(BIN)
        .args([
            "zone",
            "example.test",
            "--real-mx",
            "mail.example.test",
            "--magic",
            "mx1.magic.test",
        ])
        .output()
        .unwrap();
    assert!(
        zone.status.success(),
        "{}",
        String::from_utf8_lossy(&zone.stderr)
    );
    let zone = String::from_utf8_lossy(&zone.stdout).into_owned();
    // Zone-file lines → dnsmasq `mx-host=` lines.
    let mut conf: Vec<String> = zone
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(&f[2..4], ["IN", "MX"], "{l}");
            format!(
                "mx-host={},{},{}",
                f[0].trim_end_matches('.'),
                f[5].trim_end_matches('.'),
                f[4]
            )
        })
        .collect();
    assert_eq!(conf.len(), 2, "{zone}");
    conf.extend([
        "host-record=mx1.magic.test,127.0.190.1".into(),
        "host-record=mail.example.test,127.0.0.1".into(),
        // A domain whose real MX is tried first.
        "mx-host=wrong.test,mail.example.test,5".into(),
        "mx-host=wrong.test,mx1.magic.test,10".into(),
    ]);
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let dnsmasq = Dnsmasq::start(SocketAddr::new(ip, free_dns_port(ip)), &conf);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    let toml = node_toml("127.0.0.1:0", pf.smtpd.port(), dnsmasq.addr, "");
    std::fs::write(
        &cfg,
        toml.replace("DATA_DIR", dir.path().join("data").to_str().unwrap()),
    )
    .unwrap();
    let check = |domain: &str, probe: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["check-domain", domain, "--config"]).arg(&cfg);
        if probe {
            cmd.arg("--probe");
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, report) = check("example.test", false);
    assert!(ok, "{report}");
    assert!(
        report.contains("ok    a magic host is most preferred: mx1.magic.test (10)"),
        "{report}"
    );
    assert!(
        report.contains("ok    real MX after skipping magic hosts: mail.example.test (20)"),
        "{report}"
    );
    let (ok, report) = check("example.test", true);
    assert!(ok, "{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("ok") && l.contains("refuses a direct transaction"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(line.contains("450 4.7.1"), "{line}");
    pf.wait_log(
        &["NOQUEUE: reject: RCPT from", "postmaster@example.test"],
        WAIT,
    );
    assert_eq!(
        policy
            .log_lines_with(&["policy decision", "client=\"127.0.0.1\"", "defer_if_permit"])
            .len(),
        1
    );

    let (ok, report) = check("wrong.test", false);
    assert!(!ok, "{report}");
    assert!(
        report.contains("FAIL  the most preferred MX is not magic: mail.example.test (5)"),
        "{report}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}
