//! A full disk, for real: the node's data_dir is a small tmpfs (interop:
//! mounting needs root, as `.ci/run` has). While it is full the node answers
//! `451` and acknowledges nothing, and `/healthz` says `503` with the reason;
//! once space is freed it answers `250` again by itself, without a restart,
//! and `/healthz` says `200`. The message acknowledged before the disk
//! filled is still there.
#![cfg(feature = "interop")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{simple_message, Client, DnsServer, Node, NodeConf};

/// A tmpfs mounted on `dir` for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = if is_root() {
            Command::new("mount")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "mount"]);
            c
        };
        let out = cmd
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (needs root or password-less sudo): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let mut cmd = if is_root() {
            Command::new("umount")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "umount"]);
            c
        };
        let _ = cmd.arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
    }
    let _ = f.sync_all();
}

fn healthz(admin: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

fn send(node: &Node, subject: &str) -> u16 {
    let mut c = Client::connect(node.smtp_addr);
    c.ehlo("client.test");
    c.expect("MAIL FROM:<a@sender.test>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("DATA", 354);
    let msg = simple_message("a@sender.test", "b@example.test", subject);
    c.send(&common::client::data_transfer(&msg));
    let r = c.reply();
    let _ = c.try_send(b"QUIT\r\n");
    r.code
}

#[test]
fn a_full_disk_answers_451_and_recovers_by_itself() {
    let dns = DnsServer::start(&[]);
    let dir = tempfile::Builder::new()
        .prefix("magicmx-diskfull-")
        .tempdir()
        .unwrap();
    let _fs = Tmpfs::mount(&dir.path().join("data"), "24m");
    let mut conf = NodeConf::new(dns.addr, 9);
    // Nothing is relayed (port 9, no MX): the messages stay in the spool.
    conf.throttle = vec![("hold".into(), "\"1h\"".into())];
    conf.tail = "\n[admin]\nlisten = \"127.0.0.1:0\"\n".into();
    let node = Node::start_in(dir, conf);
    // The node writes its admin address just after it starts listening.
    let addr_file = node.data_dir.join("admin.addr");
    let mut admin = None;
    assert!(common::wait_until(Duration::from_secs(10), || {
        admin = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok());
        admin.is_some()
    }));
    let admin = admin.unwrap();
    assert_eq!(healthz(admin).0, 200);
    assert_eq!(
        send(&node, "before"),
        250,
        "a message before the disk fills"
    );

    let filler = node.data_dir.join("filler");
    fill(&filler);
    // Full: every attempt is refused with a temporary error, never 250.
    let mut refused = 0;
    for i in 0..5 {
        let code = send(&node, &format!("while full {i}"));
        assert_ne!(code, 250, "acknowledged a message on a full disk");
        if code == 451 {
            refused += 1;
        }
    }
    assert!(refused > 0, "no 451 while the disk was full");
    let (code, text) = healthz(admin);
    assert_eq!(code, 503, "/healthz while the disk is full:\n{text}");

    std::fs::remove_file(&filler).unwrap();
    // Space is back: the node recovers by itself (no restart).
    assert!(
        common::wait_until(Duration::from_secs(20), || healthz(admin).0 == 200),
        "/healthz did not turn 200 after space was freed"
    );
    assert_eq!(send(&node, "after"), 250, "no 250 after space was freed");
    let listing = node.queue_list();
    assert!(
        common::node::queue_rows(&listing).len() >= 2,
        "the messages before and after are not both queued:\n{listing}"
    );
}
