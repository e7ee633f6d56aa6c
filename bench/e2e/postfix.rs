//! A private Postfix instance relaying one domain to the sink: its own
//! config, queue and data directories and maillog in a temporary
//! directory, smtpd on a free loopback port, `relayhost = [127.0.0.1]:SINK`
//! (no DNS), chroot off. Queue durability is Postfix's default (the
//! cleanup daemon fsyncs every queue file before smtpd says 250).
//! Started with `postfix -c DIR start` (needs root) and stopped on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's master.cf services, without chroot.
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

pub struct Postfix {
    dir: tempfile::TempDir,
    pub smtpd: SocketAddr,
    pub master_pid: u32,
    /// The main.cf lines this harness wrote (for RESULTS.md).
    pub main_cf: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postfix {
    pub fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn start(domain: &str, sink: SocketAddr) -> anyhow::Result<Postfix> {
        let dir = tempfile::Builder::new()
            .prefix("magicmx-bench-postfix-")
            .tempdir()?;
        let d = dir.path();
        Command::new("chmod").arg("755").arg(d).status()?;
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir(d.join(sub))?;
        }
        Command::new("chown")
            .arg("postfix:postfix")
            .arg(d.join("data"))
            .status()?;
        let smtpd = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let main_cf = vec![
            "compatibility_level = 3.6".to_string(),
            format!("queue_directory = {}", d.join("queue").display()),
            format!("data_directory = {}", d.join("data").display()),
            "mail_owner = postfix".into(),
            "setgid_group = postdrop".into(),
            "myhostname = relay.postfix.bench.test".into(),
            "inet_interfaces = 127.0.0.1".into(),
            "inet_protocols = ipv4".into(),
            "mydestination =".into(),
            "alias_maps =".into(),
            "alias_database =".into(),
            "biff = no".into(),
            "smtputf8_enable = no".into(),
            "smtpd_peername_lookup = no".into(),
            "mynetworks = 127.0.0.0/8".into(),
            format!("relay_domains = {domain}"),
            format!("relayhost = [{}]:{}", sink.ip(), sink.port()),
            format!("maillog_file = {}", d.join("maillog").display()),
            format!("maillog_file_prefixes = {}", d.display()),
        ];
        std::fs::write(d.join("etc/main.cf"), main_cf.join("\n") + "\n")?;
        let master = format!(
            "{}:{} inet n - n - - smtpd\n{MASTER_CF}",
            smtpd.ip(),
            smtpd.port()
        );
        std::fs::write(d.join("etc/master.cf"), master)?;
        let out = Command::new("postfix")
            .arg("-c")
            .arg(d.join("etc"))
            .arg("start")
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "postfix start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(d.join("maillog")).unwrap_or_default()
            );
        }
        let pid_file = d.join("queue/pid/master.pid");
        let deadline = Instant::now() + Duration::from_secs(15);
        let master_pid = loop {
            if let Some(p) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            if Instant::now() > deadline {
                anyhow::bail!("no {}", pid_file.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let pf = Postfix {
            dir,
            smtpd,
            master_pid,
            main_cf,
        };
        while std::net::TcpStream::connect_timeout(&pf.smtpd, Duration::from_secs(1)).is_err() {
            if Instant::now() > deadline {
                anyhow::bail!("Postfix does not listen on {}:\n{}", pf.smtpd, pf.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pf)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.etc())
            .arg("stop")
            .output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.master_pid)).exists() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        if Path::new(&format!("/proc/{}", self.master_pid)).exists() {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(self.master_pid.to_string())
                .status();
        }
    }
}

/// Is a private Postfix possible here (postfix installed, root)?
pub fn available() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("a private Postfix instance needs root".into());
    }
    for tool in ["postfix", "smtp-source"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!(
                "{tool} is not installed (bench/run.sh installs it)"
            ));
        }
    }
    Ok(())
}
