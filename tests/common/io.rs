//! A blocking, line-oriented connection for the raw client talking to the
//! node. It keeps its own read buffer so that STARTTLS can check that
//! nothing was pipelined behind the command before upgrading.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

pub enum Stream {
    Plain(TcpStream),
    ClientTls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ClientTls(s) => &s.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::ClientTls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::ClientTls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::ClientTls(s) => s.flush(),
        }
    }
}

/// What a read with a deadline produced.
#[derive(Debug)]
pub enum ReadLine {
    Line(Vec<u8>),
    Closed,
    Timeout,
}

pub struct LineConn {
    stream: Option<Stream>,
    buf: Vec<u8>,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl LineConn {
    pub fn new(stream: TcpStream) -> LineConn {
        LineConn {
            stream: Some(Stream::Plain(stream)),
            buf: Vec::new(),
        }
    }

    pub fn stream(&self) -> &Stream {
        self.stream.as_ref().expect("stream present")
    }

    fn stream_mut(&mut self) -> &mut Stream {
        self.stream.as_mut().expect("stream present")
    }

    pub fn is_tls(&self) -> bool {
        self.stream().is_tls()
    }

    pub fn set_read_timeout(&self, d: Duration) {
        self.stream()
            .tcp()
            .set_read_timeout(Some(d))
            .expect("set_read_timeout");
    }

    /// Bytes received but not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    /// Reads more bytes into the buffer; Ok(false) on end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream_mut().read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Next line ending with `end` (`b"\r\n"` for strict SMTP framing, `b"\n"`
    /// to be lenient), terminator included. A partial line stays buffered.
    pub fn read_line(&mut self, end: &[u8]) -> ReadLine {
        loop {
            if let Some(pos) = self.buf.windows(end.len()).position(|w| w == end) {
                let rest = self.buf.split_off(pos + end.len());
                let line = std::mem::replace(&mut self.buf, rest);
                return ReadLine::Line(line);
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return ReadLine::Closed,
                Err(e) if is_timeout(&e) => return ReadLine::Timeout,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadLine::Closed,
            }
        }
    }

    /// Turns the plain connection into the client side of TLS.
    pub fn upgrade_client(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> io::Result<()> {
        let Some(Stream::Plain(tcp)) = self.stream.take() else {
            panic!("upgrade_client on a connection that is not plain text");
        };
        let name = ServerName::try_from(server_name.to_string()).map_err(io::Error::other)?;
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        self.stream = Some(Stream::ClientTls(Box::new(tls)));
        Ok(())
    }
}
