//! A hostile "real MX" (anyone can publish one with `mx_delegation`), seen
//! end to end through the node's relay (issue 9): a greeting streamed
//! without CRLF fails the attempt as temporary after `max_reply_line_length`
//! octets (the node reads no further), an MX that accepts TCP and never
//! greets is left after `greeting_timeout`, and neither delays mail for
//! another domain. The message stays queued (deferred), never bounced.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::{simple_message, Client, DnsServer, Rec, Sink};

/// A listener on 127.0.0.2 at `port` that runs `behave` for each connection
/// (on its own thread) and counts the bytes the node sent it.
fn hostile(port: u16, behave: fn(TcpStream)) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(("127.0.0.2", port)).expect("bind 127.0.0.2");
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || behave(stream));
        }
    });
    connections
}

/// Bytes the endless greeting got into the node's socket before the node
/// hung up (the kernel's buffers take some; the node reads 512 at most).
static STREAMED: AtomicUsize = AtomicUsize::new(0);

/// Streams greeting bytes with no CRLF for as long as the peer reads.
fn endless_greeting(mut s: TcpStream) {
    let chunk = [b'2'; 64 * 1024];
    while s.write_all(&chunk).is_ok() {
        if STREAMED.fetch_add(chunk.len(), Ordering::SeqCst) > 1 << 30 {
            break;
        }
    }
}

/// Accepts and never says a word; holds the connection until the peer
/// closes it.
fn silent(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn node(dns: &DnsServer, port: u16) -> InProc {
    InProc::start(&format!(
        "[accept]\ndomains = [\"hostile.test\", \"silent.test\", \"good.test\"]\n\
         [throttle]\nhold = \"0s\"\n\
         [trust]\nnetworks = [\"127.0.0.0/8\"]\n\
         [relay]\nport = {port}\ndeny_networks = []\nretry_initial = \"1h\"\nretry_max = \"1h\"\ntls = \"none\"\n\
         greeting_timeout = \"2s\"\nconcurrency = 4\ndestination_concurrency = 2\n\
         [dns]\nnameservers = [\"{}\"]\n\
         [verify]\nenabled = false\n",
        dns.addr
    ))
}

fn queue_has(node: &InProc, rcpt: &str) -> bool {
    let (_, text) = node.cli(&["queue", "list"]);
    text.contains(rcpt)
}

#[test]
fn hostile_real_mx_hosts_cost_bounded_time_and_memory_and_delay_no_one_else() {
    // One port for all three "real MX" hosts (the relay's port is global):
    // the good sink on 127.0.0.1, the hostile ones on 127.0.0.2/127.0.0.3.
    let sink = Sink::start("127.0.0.1");
    let port = sink.addr.port();
    let streamed = hostile(port, endless_greeting);
    let silent_listener = TcpListener::bind(("127.0.0.3", port)).expect("bind 127.0.0.3");
    let silent_seen = Arc::new(AtomicUsize::new(0));
    {
        let seen = silent_seen.clone();
        std::thread::spawn(move || {
            for s in silent_listener.incoming().flatten() {
                seen.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || silent(s));
            }
        });
    }
    let dns = DnsServer::start(&[
        Rec::Mx("hostile.test", 10, "mx.hostile.test"),
        Rec::A("mx.hostile.test", "127.0.0.2"),
        Rec::Mx("silent.test", 10, "mx.silent.test"),
        Rec::A("mx.silent.test", "127.0.0.3"),
        Rec::Mx("good.test", 10, "mx.good.test"),
        Rec::A("mx.good.test", "127.0.0.1"),
    ]);
    let node = node(&dns, port);
    let mut c = Client::connect(node.smtp);
    c.ehlo("client.test");
    for rcpt in [
        "a@hostile.test",
        "b@silent.test",
        "c@hostile.test",
        "d@silent.test",
    ] {
        let r = common::client::transaction(
            &mut c,
            "alice@sender.test",
            &[rcpt],
            &simple_message("alice@sender.test", rcpt, "to a hostile MX"),
        );
        assert_eq!(r.code, 250, "{r}");
    }
    // Mail for a good domain, sent while the hostile hosts hold their
    // attempts, arrives at once.
    let start = Instant::now();
    let r = common::client::transaction(
        &mut c,
        "alice@sender.test",
        &["e@good.test"],
        &simple_message("alice@sender.test", "e@good.test", "to a good MX"),
    );
    assert_eq!(r.code, 250, "{r}");
    sink.wait_messages(1, Duration::from_secs(10));
    let good_delay = start.elapsed();
    eprintln!("good domain delivered after {good_delay:?}");
    assert!(
        good_delay < Duration::from_secs(2),
        "the good domain waited {good_delay:?} behind hostile MX hosts"
    );
    // The hostile attempts end as temporary failures (4.4.1): deferred, not
    // bounced; the streamed greeting at 512 octets, the silent MX after
    // `greeting_timeout`.
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            let (_, text) = node.cli(&["queue", "list"]);
            text.matches("reply line longer than 512 octets").count() == 2
                && text
                    .matches("timed out after 2s waiting for the greeting")
                    .count()
                    == 2
        }),
        "hostile attempts did not end: {}",
        node.cli(&["queue", "list"]).1
    );
    assert!(streamed.load(Ordering::SeqCst) >= 1);
    let bytes = STREAMED.load(Ordering::SeqCst);
    eprintln!("the endless greeting got {bytes} bytes in before the node hung up");
    assert!(
        bytes < 64 << 20,
        "the node kept reading an endless greeting ({bytes} bytes)"
    );
    assert!(silent_seen.load(Ordering::SeqCst) >= 1);
    for rcpt in ["a@hostile.test", "b@silent.test"] {
        assert!(queue_has(&node, rcpt), "{rcpt} is no longer queued");
    }
    // No DSN went anywhere: the sink got only the good message.
    assert_eq!(sink.messages().len(), 1);
}
