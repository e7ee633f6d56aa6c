//! A damaged spool, end to end through the binary (issue 9, "Faults"): a
//! node holding acknowledged messages is killed, its spool file emptied or
//! deleted; `magicmx run` refuses to start on it (naming the file and
//! `--new-spool`) instead of starting as an empty queue, and starts with
//! `--new-spool` only when told.

mod common;

use std::process::Command;
use std::time::Duration;

use common::node::BIN;
use common::{simple_message, Client, DnsServer, Node, NodeConf};

fn queued_node(dns: &DnsServer) -> Node {
    let mut conf = NodeConf::new(dns.addr, 9);
    // Nothing is relayed: the messages stay queued.
    conf.throttle = vec![("hold".into(), "\"1h\"".into())];
    let node = Node::start(conf);
    let mut c = Client::connect(node.smtp_addr);
    c.ehlo("client.test");
    for i in 0..50 {
        let r = common::client::transaction(
            &mut c,
            "a@sender.test",
            &["b@example.test"],
            &simple_message("a@sender.test", "b@example.test", &format!("m{i}")),
        );
        assert_eq!(r.code, 250, "{r}");
    }
    c.expect("QUIT", 221);
    node
}

/// `magicmx run` on the node's config, expected to exit at once.
fn run_exits(node: &Node, extra: &[&str]) -> (bool, String) {
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&node.config_path)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "magicmx run kept running on a damaged spool:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_emptied_or_deleted_spool_is_refused_at_start() {
    let dns = DnsServer::start(&[]);
    for damage in ["truncate", "delete"] {
        let mut node = queued_node(&dns);
        assert_eq!(common::node::queue_rows(&node.queue_list()).len(), 50);
        node.kill();
        let file = node.data_dir.join("spool/spool.redb");
        match damage {
            "truncate" => std::fs::write(&file, b"").unwrap(),
            _ => std::fs::remove_file(&file).unwrap(),
        }
        let (ok, text) = run_exits(&node, &[]);
        assert!(!ok, "{damage}: started on a damaged spool:\n{text}");
        assert!(
            text.contains("--new-spool"),
            "{damage}: the refusal does not say how to go on:\n{text}"
        );
        // Told, it starts with an empty queue.
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&node.config_path)
            .arg("--new-spool")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = common::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(node.data_dir.join("spool/spool.marker")).is_ok()
                && node
                    .data_dir
                    .join("spool/spool.redb")
                    .metadata()
                    .is_ok_and(|m| m.len() > 0)
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(started, "{damage}: --new-spool did not start a new spool");
    }
}
