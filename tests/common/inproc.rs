//! A node running in-process (the library's `Node::start` on its own
//! runtime and thread), for tests that need the node's internals, e.g. to
//! push peers' counts through `Throttle::merge`, or to cancel its shutdown
//! token. The CLI can still be run against it (`InProc::cli`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use magicmx::throttle::Throttle;
use tokio_util::sync::CancellationToken;

/// A node running in-process on its own runtime.
pub struct InProc {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub throttle: Arc<Throttle>,
    pub smtp: SocketAddr,
    /// The outbound door (`[outbound] listen`), when configured.
    pub outbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProc {
    /// `toml_tail` is appended after `[node]`, `[smtp]` and `[admin]`.
    pub fn start(toml_tail: &str) -> InProc {
        InProc::start_with_smtp("", toml_tail)
    }

    /// Like `start`, with extra `[smtp]` lines.
    pub fn start_with_smtp(smtp: &str, toml_tail: &str) -> InProc {
        InProc::start_on(magicmx::clock::Clock::system(), smtp, toml_tail)
    }

    /// Like `start_with_smtp`, on a manual clock the test advances (throttle
    /// windows and penalties, greylisting, hold and retries follow it).
    pub fn start_manual(smtp: &str, toml_tail: &str) -> (InProc, magicmx::clock::ManualClock) {
        let (clock, manual) = magicmx::clock::Clock::manual_now();
        (InProc::start_on(clock, smtp, toml_tail), manual)
    }

    /// Like `start_with_smtp`, in `dir` (its `node.toml` is overwritten;
    /// files already under `dir/data`, e.g. keys, are the node's).
    pub fn start_in(dir: tempfile::TempDir, smtp: &str, toml_tail: &str) -> InProc {
        InProc::start_in_on(dir, magicmx::clock::Clock::system(), smtp, toml_tail)
    }

    fn start_on(clock: magicmx::clock::Clock, smtp: &str, toml_tail: &str) -> InProc {
        InProc::start_in_on(tempfile::tempdir().unwrap(), clock, smtp, toml_tail)
    }

    fn start_in_on(
        dir: tempfile::TempDir,
        clock: magicmx::clock::Clock,
        smtp: &str,
        toml_tail: &str,
    ) -> InProc {
        let config_path = dir.path().join("node.toml");
        // Recipient verification needs a reachable real MX; the tests that
        // are about it (tests/verify.rs) give their own `[verify]`.
        let verify = if toml_tail.contains("[verify]") {
            ""
        } else {
            "[verify]\nenabled = false\n"
        };
        let text = format!(
            "[node]\nname = \"t1\"\nhostname = \"node1.magic.test\"\ndata_dir = \"data\"\nmagic_suffixes = [\".magic.test\"]\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp}[admin]\nlisten = \"127.0.0.1:0\"\n{toml_tail}\n{verify}"
        );
        std::fs::write(&config_path, text).unwrap();
        let config = magicmx::Config::load(&config_path).unwrap();
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let node = magicmx::Node::start_with_clock(config, stop, clock)
                    .await
                    .unwrap();
                tx.send((
                    node.throttle.clone(),
                    node.smtp_addrs[0],
                    node.outbound_addrs.first().copied(),
                    node.admin_addr.unwrap(),
                ))
                .unwrap();
                node.wait().await.unwrap();
            });
        });
        let (throttle, smtp, outbound, admin) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        InProc {
            dir,
            config_path,
            throttle,
            smtp,
            outbound,
            admin,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_magicmx"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn http_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = &self.dir;
    }
}
