//! A raw SMTP client for tests that need control over every byte: it sends
//! exactly what it is given and reads complete (multi-line) replies, with
//! deadlines. It can connect from a chosen loopback address (`127.a.b.c`) so
//! that tests look like different source blocks.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::io::{LineConn, ReadLine};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// True if an EHLO reply lists `keyword` (case-insensitive).
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    pub fn class(&self) -> u16 {
        self.code / 100
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}{sep}{l}", self.code)?;
        }
        Ok(())
    }
}

/// What came back within a deadline.
#[derive(Debug)]
pub enum Next {
    Reply(Reply),
    /// The server closed the connection (or reset it).
    Closed,
    /// Nothing complete arrived in time.
    Timeout,
}

pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Client {
    conn: LineConn,
    pub server: SocketAddr,
    pub local: SocketAddr,
    /// The greeting.
    pub banner: Reply,
}

impl Client {
    /// Connects and reads the greeting (which must be 220).
    pub fn connect(server: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
        Client::from_stream(stream, server)
    }

    /// Connects from `local_ip` (any port), e.g. `127.0.3.7`.
    pub fn connect_from(local_ip: &str, server: SocketAddr) -> Client {
        Client::from_stream(tcp_from(local_ip, server), server)
    }

    fn from_stream(stream: TcpStream, server: SocketAddr) -> Client {
        let local = stream.local_addr().expect("local addr");
        let _ = stream.set_nodelay(true);
        let mut c = Client {
            conn: LineConn::new(stream),
            server,
            local,
            banner: Reply {
                code: 0,
                lines: vec![],
            },
        };
        let banner = c.reply();
        assert_eq!(banner.code, 220, "greeting from {server}: {banner}");
        c.banner = banner;
        c
    }

    pub fn is_tls(&self) -> bool {
        self.conn.is_tls()
    }

    /// Sends bytes as they are (one write).
    pub fn send(&mut self, bytes: &[u8]) {
        self.conn
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("send to {}: {e}", self.server));
    }

    /// Sends, reporting failure instead of panicking (the server may have
    /// closed the connection, which some tests accept).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_all(bytes)
    }

    /// The next complete reply within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Next {
        self.conn.set_read_timeout(timeout);
        let mut lines = Vec::new();
        let mut code = 0;
        loop {
            let line = match self.conn.read_line(b"\n") {
                ReadLine::Line(l) => l,
                ReadLine::Closed => return Next::Closed,
                ReadLine::Timeout => return Next::Timeout,
            };
            let text = String::from_utf8_lossy(&line).into_owned();
            assert!(
                text.ends_with("\r\n"),
                "reply line from {} not terminated by CRLF: {text:?}",
                self.server
            );
            let text = &text[..text.len() - 2];
            assert!(
                text.len() >= 3 && text.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                "malformed reply line from {}: {text:?} (after {lines:?})",
                self.server
            );
            let this_code: u16 = text[..3].parse().expect("code");
            if lines.is_empty() {
                code = this_code;
            } else {
                assert_eq!(
                    this_code, code,
                    "code changed inside a multi-line reply: {text:?}"
                );
            }
            let sep = text.as_bytes().get(3).copied();
            lines.push(text.get(4..).unwrap_or("").to_string());
            match sep {
                Some(b'-') => continue,
                None | Some(b' ') => return Next::Reply(Reply { code, lines }),
                Some(other) => panic!("bad separator {:?} in reply {text:?}", other as char),
            }
        }
    }

    /// The next reply; panics if none comes in time or the server closes.
    pub fn reply(&mut self) -> Reply {
        match self.next(REPLY_TIMEOUT) {
            Next::Reply(r) => r,
            other => panic!(
                "expected a reply from {}, got {other:?} (pending bytes: {:?})",
                self.server,
                String::from_utf8_lossy(self.conn.pending())
            ),
        }
    }

    /// Sends `line` + CRLF and returns the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} → {r}");
        r
    }

    pub fn ehlo(&mut self, name: &str) -> Reply {
        self.expect(&format!("EHLO {name}"), 250)
    }

    /// Bytes received and not consumed yet.
    pub fn pending(&self) -> Vec<u8> {
        self.conn.pending().to_vec()
    }

    /// TLS handshake on the current connection (after a 220 to STARTTLS).
    pub fn upgrade_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> std::io::Result<()> {
        assert!(
            self.conn.pending().is_empty(),
            "server sent bytes after its STARTTLS reply, before the handshake: {:?}",
            String::from_utf8_lossy(self.conn.pending())
        );
        self.conn.upgrade_client(config, server_name)
    }
}

/// RFC 5321 4.5.2 transparency: a leading `.` on a line is doubled.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// The bytes of a DATA transfer for a message that ends with CRLF.
pub fn data_transfer(message: &[u8]) -> Vec<u8> {
    assert!(
        message.ends_with(b"\r\n"),
        "test message must end with CRLF"
    );
    let mut out = dot_stuff(message);
    out.extend_from_slice(b".\r\n");
    out
}

/// One complete transaction on an open session (after EHLO). Asserts every
/// step up to DATA succeeds and returns the reply to the end of data.
pub fn transaction(c: &mut Client, from: &str, rcpts: &[&str], message: &[u8]) -> Reply {
    c.expect(&format!("MAIL FROM:<{from}>"), 250);
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(&data_transfer(message));
    c.reply()
}

/// Connects, EHLO, one transaction, QUIT; returns the reply to the data.
pub fn send_mail(server: SocketAddr, from: &str, rcpts: &[&str], message: &[u8]) -> Reply {
    let mut c = Client::connect(server);
    c.ehlo("client.example.net");
    let r = transaction(&mut c, from, rcpts, message);
    let _ = c.try_send(b"QUIT\r\n");
    r
}

/// A blocking TCP connection from `local_ip` (any port), e.g. `127.0.3.7`:
/// a client in another source block.
pub fn tcp_from(local_ip: &str, server: SocketAddr) -> TcpStream {
    let local: IpAddr = local_ip.parse().expect("local IP");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .expect("runtime");
    let stream = rt
        .block_on(async {
            let socket = match local {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(local, 0))?;
            let s = tokio::time::timeout(Duration::from_secs(10), socket.connect(server))
                .await
                .map_err(std::io::Error::other)??;
            s.into_std()
        })
        .unwrap_or_else(|e| panic!("connect from {local_ip} to {server}: {e}"));
    stream.set_nonblocking(false).expect("blocking");
    stream
}

/// A small well-formed message with a unique subject.
pub fn simple_message(from: &str, to: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.example.net>\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello,\r\nthis is {subject}.\r\n"
    )
    .into_bytes()
}
