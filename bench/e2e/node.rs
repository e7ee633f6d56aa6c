//! A `magicmx run` process from a TOML text, logging to a file in its own
//! temporary directory; its addresses come from its `... listening addr=`
//! lines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The magicmx binary under test: `E2E_MAGICMX_BIN` or the one cargo built.
pub fn bin() -> String {
    std::env::var("E2E_MAGICMX_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_magicmx").to_string())
}

pub struct MagicNode {
    child: Child,
    pub log: PathBuf,
    pub smtp: SocketAddr,
    pub pid: u32,
    _tmp: Option<tempfile::TempDir>,
}

impl MagicNode {
    /// `toml` may say `@DATA@` and `@DIR@`: replaced by the data directory and the node's directory.
    pub fn start(name: &str, toml: &str) -> anyhow::Result<MagicNode> {
        MagicNode::start_bin(&bin(), name, toml)
    }

    /// Runs `bin` (another build of magicmx) instead of the default one.
    pub fn start_bin(bin: &str, name: &str, toml: &str) -> anyhow::Result<MagicNode> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("magicmx-bench-{name}-"))
            .tempdir()?;
        let mut node = MagicNode::start_in_with(bin, tmp.path(), toml)?;
        node._tmp = Some(tmp);
        Ok(node)
    }

    pub fn start_in(dir: &Path, toml: &str) -> anyhow::Result<MagicNode> {
        MagicNode::start_in_with(&bin(), dir, toml)
    }

    fn start_in_with(bin: &str, dir: &Path, toml: &str) -> anyhow::Result<MagicNode> {
        let config = dir.join("node.toml");
        let data = dir.join("data");
        std::fs::write(
            &config,
            toml.replace("@DATA@", data.to_str().unwrap())
                .replace("@DIR@", dir.to_str().unwrap()),
        )?;
        let log = dir.join("magicmx.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {bin}: {e}"))?;
        let pid = child.id();
        let mut node = MagicNode {
            child,
            log,
            smtp: "0.0.0.0:0".parse().unwrap(),
            pid,
            _tmp: None,
        };
        node.smtp = node.addr("smtp listening", Duration::from_secs(20))?;
        Ok(node)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of the first `<what> addr=...` log line.
    pub fn addr(&mut self, what: &str, timeout: Duration) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            let found = text.lines().find_map(|l| {
                let rest = &l[l.find(what)?..];
                let v = &rest[rest.find("addr=")? + 5..];
                v.split_whitespace().next()?.trim_matches('"').parse().ok()
            });
            if let Some(a) = found {
                return Ok(a);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("magicmx exited with {status}:\n{text}");
            }
            if Instant::now() > deadline {
                anyhow::bail!("no `{what}` line in {}:\n{text}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MagicNode {
    fn drop(&mut self) {
        // SIGTERM first (clean spool close), then SIGKILL.
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
