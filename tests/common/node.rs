//! Runs the real `magicmx` binary: writes a config into a temporary
//! directory, starts `magicmx run --config`, collects its stderr (and
//! stdout) line by line, and finds the SMTP port from the
//! `smtp listening addr=IP:PORT` log line. The logs are printed when a test
//! fails, so a failing assertion comes with the node's side of the story.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::tls::TlsFiles;

pub const BIN: &str = env!("CARGO_BIN_EXE_magicmx");

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The node's configuration, written as TOML by `Node::start`.
#[derive(Clone, Debug)]
pub struct NodeConf {
    pub name: String,
    pub hostname: String,
    pub magic_suffixes: Vec<String>,
    pub accept_domains: Vec<String>,
    pub mx_delegation: bool,
    pub relay_port: u16,
    pub relay_tls: String,
    pub retry_initial: String,
    pub retry_max: String,
    pub nameservers: Vec<SocketAddr>,
    /// Extra `key = value` lines (value in TOML syntax) for `[smtp]`.
    pub smtp_extra: Vec<(String, String)>,
    /// Extra `key = value` lines for `[relay]`.
    pub relay_extra: Vec<(String, String)>,
    /// `key = value` lines for `[throttle]`.
    pub throttle: Vec<(String, String)>,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// More TOML after everything else (whole sections, e.g. `[admin]`).
    pub tail: String,
}

impl NodeConf {
    /// A node accepting `example.test`, relaying to `relay_port`, resolving
    /// through `dns`. Its own name is not the magic MX name used in tests,
    /// so skipping magic hosts is tested, not skipping its own name.
    pub fn new(dns: SocketAddr, relay_port: u16) -> NodeConf {
        NodeConf {
            name: "t1".into(),
            hostname: "node1.magic.test".into(),
            magic_suffixes: vec![".magic.test".into()],
            accept_domains: vec!["example.test".into()],
            mx_delegation: false,
            relay_port,
            relay_tls: "opportunistic".into(),
            retry_initial: "1s".into(),
            retry_max: "2s".into(),
            nameservers: vec![dns],
            smtp_extra: Vec::new(),
            relay_extra: Vec::new(),
            // Release accepted mail at once: the tests are about relaying.
            throttle: vec![("hold".into(), "\"100ms\"".into())],
            tls: None,
            tail: String::new(),
        }
    }

    pub fn smtp(mut self, key: &str, value: impl ToString) -> Self {
        self.smtp_extra.push((key.into(), value.to_string()));
        self
    }

    pub fn relay(mut self, key: &str, value: impl ToString) -> Self {
        self.relay_extra.push((key.into(), value.to_string()));
        self
    }

    pub fn accept(mut self, domains: &[&str]) -> Self {
        self.accept_domains = domains.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn mx_delegation(mut self, on: bool) -> Self {
        self.mx_delegation = on;
        self
    }

    pub fn relay_tls(mut self, mode: &str) -> Self {
        self.relay_tls = mode.into();
        self
    }

    pub fn tls(mut self, files: &TlsFiles) -> Self {
        self.tls = Some((files.cert.clone(), files.key.clone()));
        self
    }

    pub fn to_toml(&self, data_dir: &Path) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut t = String::new();
        t += "[node]\n";
        t += &format!("name = {:?}\n", self.name);
        t += &format!("hostname = {:?}\n", self.hostname);
        t += &format!("data_dir = {:?}\n", data_dir.display().to_string());
        t += &format!("magic_suffixes = [{}]\n", list(&self.magic_suffixes));
        t += "\n[smtp]\n";
        t += "listen = [\"127.0.0.1:0\"]\n";
        if let Some((cert, key)) = &self.tls {
            t += &format!("tls_cert = {:?}\n", cert.display().to_string());
            t += &format!("tls_key = {:?}\n", key.display().to_string());
        }
        for (k, v) in &self.smtp_extra {
            t += &format!("{k} = {v}\n");
        }
        t += "\n[accept]\n";
        t += &format!("domains = [{}]\n", list(&self.accept_domains));
        t += &format!("mx_delegation = {}\n", self.mx_delegation);
        t += "\n[relay]\n";
        t += &format!("port = {}\n", self.relay_port);
        t += &format!("retry_initial = {:?}\n", self.retry_initial);
        t += &format!("retry_max = {:?}\n", self.retry_max);
        t += &format!("tls = {:?}\n", self.relay_tls);
        // The sinks standing in for real MX hosts are on loopback.
        if !self.relay_extra.iter().any(|(k, _)| k == "deny_networks") {
            t += "deny_networks = []\n";
        }
        for (k, v) in &self.relay_extra {
            t += &format!("{k} = {v}\n");
        }
        if !self.throttle.is_empty() {
            t += "\n[throttle]\n";
            for (k, v) in &self.throttle {
                t += &format!("{k} = {v}\n");
            }
        }
        // Recipient verification needs a reachable real MX: off here, on in
        // tests/verify.rs.
        t += "\n[verify]\nenabled = false\n";
        t += "\n[dns]\n";
        let ns: Vec<String> = self.nameservers.iter().map(|a| a.to_string()).collect();
        t += &format!("nameservers = [{}]\n", list(&ns));
        t += &self.tail;
        t
    }
}

#[derive(Default)]
struct Logs {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Logs {
    fn push(&self, line: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
        self.changed.notify_all();
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Removes ANSI escape sequences (in case the log format colours fields).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn pump(reader: impl Read + Send + 'static, logs: Arc<Logs>, prefix: &'static str) {
    thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = strip_ansi(line.trim_end_matches(['\r', '\n']));
                    logs.push(format!("{prefix}{line}"));
                }
            }
        }
    });
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub conf: NodeConf,
    /// The SMTP listener of the current run.
    pub smtp_addr: SocketAddr,
    child: Option<Child>,
    logs: Arc<Logs>,
    /// Index of the first log line of the current run.
    run_start: usize,
}

/// Parses `IP:PORT` after `smtp listening` ... `addr=` in a log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let at = line.find("smtp listening")?;
    let rest = &line[at..];
    let a = rest.find("addr=")? + "addr=".len();
    let value: String = rest[a..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',' && *c != '}')
        .collect();
    value.parse().ok()
}

impl Node {
    /// Writes the config and starts the node; waits until it listens.
    pub fn start(conf: NodeConf) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("magicmx-test-")
            .tempdir()
            .expect("tempdir");
        Node::start_in(dir, conf)
    }

    /// Like `start`, in a directory the test prepared (e.g. with TLS files).
    pub fn start_in(dir: tempfile::TempDir, conf: NodeConf) -> Node {
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, conf.to_toml(&data_dir)).expect("write config");
        let mut node = Node {
            dir,
            config_path,
            data_dir,
            conf,
            smtp_addr: "0.0.0.0:0".parse().unwrap(),
            child: None,
            logs: Arc::new(Logs::default()),
            run_start: 0,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The node reads its log filter from MAGICMX_LOG (RUST_LOG as well,
        // in case). A test run can override it.
        let filter = std::env::var("MAGICMX_LOG").unwrap_or_else(|_| "info,magicmx=debug".into());
        cmd.env("MAGICMX_LOG", &filter).env("RUST_LOG", &filter);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        self.run_start = {
            let n = self.logs.snapshot().len();
            self.logs
                .push(format!("=== magicmx run (pid {}) ===", child.id()));
            n + 1
        };
        pump(child.stderr.take().unwrap(), self.logs.clone(), "");
        pump(child.stdout.take().unwrap(), self.logs.clone(), "[stdout] ");
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let lines = self.logs.snapshot();
            if let Some(addr) = lines[self.run_start..]
                .iter()
                .find_map(|l| listening_addr(l))
            {
                self.smtp_addr = addr;
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                // Let the pumps drain what is left.
                thread::sleep(Duration::from_millis(200));
                panic!(
                    "magicmx exited with {status} before logging `smtp listening addr=`\nconfig:\n{}\nlogs:\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.logs.snapshot().join("\n")
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "magicmx did not log `smtp listening addr=` within {START_TIMEOUT:?}\nlogs:\n{}",
                    lines.join("\n")
                );
            }
            let guard = self.logs.lines.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self
                .logs
                .changed
                .wait_timeout(guard, Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a crash would: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.logs.push("=== killed (SIGKILL) ===".into());
        }
    }

    /// Kills (if running) and starts again with the same config and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends a signal by name (`HUP`, `TERM`) to the running node.
    #[allow(dead_code)]
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("node running").id();
        let ok = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {name} {pid} failed");
    }

    /// Waits up to `timeout` for the node to exit; its status if it did.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().ok().flatten() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// All log lines so far (all runs).
    pub fn logs(&self) -> Vec<String> {
        self.logs.snapshot()
    }

    /// Log lines containing every one of `words`.
    pub fn log_lines_with(&self, words: &[&str]) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .collect()
    }

    /// Waits for a log line containing every one of `words`.
    pub fn wait_log(&self, words: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines_with(words).into_iter().next() {
                return l;
            }
            if Instant::now() >= deadline {
                panic!("no log line with {words:?} within {timeout:?}");
            }
            let guard = self.logs.lines.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self
                .logs
                .changed
                .wait_timeout(guard, Duration::from_millis(100));
        }
    }

    /// Runs `magicmx <args> --config <this node's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {BIN} {args:?}: {e}"))
    }

    /// Waits until `magicmx queue list` shows no message; panics after
    /// `timeout`. A message that is no longer queued can never be sent
    /// again, so a test that checks that nothing more happens (no second
    /// delivery, no DSN, no retry) waits for this instead of sleeping.
    pub fn wait_queue_empty(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let listing = self.queue_list();
            if queue_rows(&listing).is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the queue did not drain within {timeout:?}:\n{listing}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `magicmx queue list`, asserting success; returns stdout.
    pub fn queue_list(&self) -> String {
        let out = self.cli(&["queue", "list"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`magicmx queue list` failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// The message rows of a `queue list` output (without its header line
/// `id sender ...` and its footer `N message(s)`).
pub fn queue_rows(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().take(2).collect();
            let header = words == ["id", "sender"];
            let footer = words.len() == 2
                && words[0].bytes().all(|b| b.is_ascii_digit())
                && words[1].starts_with("message");
            !header && !footer
        })
        .map(str::to_string)
        .collect()
}

/// The value of `queue_id=` in a log line, if any.
pub fn queue_id(line: &str) -> Option<String> {
    let at = line.find("queue_id=")? + "queue_id=".len();
    let v: String = line[at..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',' && *c != '}')
        .collect();
    (!v.is_empty()).then_some(v)
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() || std::env::var_os("MAGICMX_TEST_SHOW_LOGS").is_some() {
            // Give the pumps a moment to collect the last lines.
            thread::sleep(Duration::from_millis(100));
            eprintln!(
                "--- magicmx node {} logs ({}):\n{}\n--- end of node logs",
                self.conf.name,
                self.config_path.display(),
                self.logs.snapshot().join("\n")
            );
        }
    }
}
