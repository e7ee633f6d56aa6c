//! The SMTP client connection: tokio I/O around the sans-IO [`reply`]
//! parser.
//!
//! A [`Conn`] owns the TCP (or TLS) stream and one read buffer. Replies are
//! read with [`Conn::read_reply`] under a deadline for the whole reply (a
//! server that drips one byte at a time gets no more time than one that is
//! silent), and the buffer never holds more than one reply's bound plus one
//! read: see [`reply::parse`]. Commands and the message data are checked
//! before they are written: a command line carries no CR, LF or NUL, and
//! the data has CRLF line ends only and no NUL ([`forbidden_in_data`]), so
//! the relay can never emit them whatever the spool holds.
//!
//! STARTTLS is opportunistic and unauthenticated (like Postfix's `may`): the
//! certificate is not checked, but the handshake still proves the server
//! holds the key it presents. Bytes that arrived before the handshake are an
//! error (response injection, the client side of CVE-2011-0411).
//!
//! When the node has a network certificate (`[gossip] cert` and `key`, from
//! `magicmx ca issue`), the handshake presents it to a server that asks for
//! one (a TLS `CertificateRequest`, Postfix's `smtpd_tls_ask_ccert = yes`),
//! so that the real MX's policy service can recognise the node by its key
//! ([`tls_config`]). A server that does not ask sees nothing different.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::reply::{self, Limits, ParseError, RawReply};

/// Why a connection cannot go on. Every one of these ends the session.
#[derive(Debug)]
pub enum ClientError {
    /// No complete reply (or write) within the stage's timeout.
    Timeout(&'static str, Duration),
    Io(std::io::Error),
    /// The server closed the connection.
    Closed,
    /// The reply broke a bound or was not SMTP.
    Reply(ParseError),
    /// The node refused to send something (CR/LF/NUL in a command).
    Refused(&'static str),
    Tls(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Timeout(stage, t) => {
                write!(f, "timed out after {t:?} waiting for {stage}")
            }
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Closed => write!(f, "connection closed by the server"),
            ClientError::Reply(e) => write!(f, "{e}"),
            ClientError::Refused(why) => write!(f, "not sent: {why}"),
            ClientError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between a failed upgrade and the drop.
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// Read size: also what the buffer may hold beyond one reply's bound.
const READ_CHUNK: usize = 4096;
/// The message data is written in pieces of about this size, each under
/// the data block timeout.
const WRITE_CHUNK: usize = 64 * 1024;

/// One SMTP connection to a remote server.
pub struct Conn {
    stream: Stream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    limits: Limits,
    tls: bool,
    /// Set once anything went wrong: the connection is not used again.
    broken: bool,
}

impl Conn {
    /// Opens a TCP connection within `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        limits: Limits,
    ) -> Result<Conn, ClientError> {
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ClientError::Timeout("the TCP connection", timeout)),
            Ok(r) => r?,
        };
        // Commands and the final `.` are small writes: never hold them for
        // the peer's delayed ACK (Nagle's algorithm).
        let _ = tcp.set_nodelay(true);
        Ok(Conn {
            stream: Stream::Plain(tcp),
            buf: Vec::with_capacity(512),
            limits,
            tls: false,
            broken: false,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// False once an error, a timeout or an unexpected byte was seen.
    pub fn is_sound(&self) -> bool {
        !self.broken
    }

    /// True if the server sent bytes that no command asked for.
    pub fn has_unread(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Marks the connection as not reusable (its state is in doubt).
    pub fn poison(&mut self) {
        self.broken = true;
    }

    /// Reads one whole reply within `timeout`.
    pub async fn read_reply(
        &mut self,
        stage: &'static str,
        timeout: Duration,
    ) -> Result<RawReply, ClientError> {
        let r = match tokio::time::timeout(timeout, self.read_reply_inner()).await {
            Err(_) => Err(ClientError::Timeout(stage, timeout)),
            Ok(r) => r,
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    async fn read_reply_inner(&mut self) -> Result<RawReply, ClientError> {
        loop {
            if let Some((reply, used)) =
                reply::parse(&self.buf, self.limits).map_err(ClientError::Reply)?
            {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let start = self.buf.len();
            self.buf.resize(start + READ_CHUNK, 0);
            let n = self.stream.read(&mut self.buf[start..]).await;
            self.buf.truncate(start + *n.as_ref().unwrap_or(&0));
            if n? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Writes command lines (each given without CRLF) in one write.
    pub async fn send_commands(
        &mut self,
        lines: &[String],
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let mut out = Vec::new();
        for line in lines {
            if line.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                self.broken = true;
                return Err(ClientError::Refused("CR, LF or NUL in a command"));
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.write(&out, "the server to take a command", timeout)
            .await
    }

    /// One command, one reply.
    pub async fn command(
        &mut self,
        line: String,
        stage: &'static str,
        timeout: Duration,
    ) -> Result<RawReply, ClientError> {
        self.send_commands(std::slice::from_ref(&line), timeout)
            .await?;
        self.read_reply(stage, timeout).await
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let w = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        let r = match tokio::time::timeout(timeout, w).await {
            Err(_) => Err(ClientError::Timeout(stage, timeout)),
            Ok(r) => r.map_err(ClientError::Io),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Sends the message data after `354`: dot-stuffed, ended by `.`,
    /// written in chunks, each within `block_timeout`. `body` must pass
    /// [`forbidden_in_data`] (checked again here).
    pub async fn send_data(
        &mut self,
        body: &[u8],
        block_timeout: Duration,
    ) -> Result<(), ClientError> {
        if let Some(why) = forbidden_in_data(body) {
            self.broken = true;
            return Err(ClientError::Refused(why));
        }
        let mut out = Vec::with_capacity(WRITE_CHUNK.min(body.len() + 8) + 1024);
        for line in body.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
            if out.len() >= WRITE_CHUNK {
                self.write(&out, "the server to take the message data", block_timeout)
                    .await?;
                out.clear();
            }
        }
        out.extend_from_slice(b".\r\n");
        self.write(&out, "the server to take the message data", block_timeout)
            .await
    }

    /// After a `220` to STARTTLS: the TLS handshake with `config` (see
    /// [`tls_config`]) within `timeout`.
    pub async fn upgrade(
        mut self,
        server_name: &str,
        config: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Conn, ClientError> {
        if !self.buf.is_empty() {
            return Err(ClientError::Tls(
                "the server sent data before the TLS handshake".into(),
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Tls("already in TLS".into()));
        };
        let name = match server_name.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(server_name.to_string())
                .map_err(|e| ClientError::Tls(e.to_string()))?,
        };
        let connector = TlsConnector::from(config);
        let tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Err(_) => return Err(ClientError::Timeout("the TLS handshake", timeout)),
            Ok(Err(e)) => return Err(ClientError::Tls(e.to_string())),
            Ok(Ok(tls)) => tls,
        };
        self.stream = Stream::Tls(Box::new(tls));
        self.tls = true;
        Ok(self)
    }

    /// Best-effort `QUIT` within `timeout`, then close.
    pub async fn quit(mut self, timeout: Duration) {
        if self.broken {
            return;
        }
        let _ = tokio::time::timeout(timeout, async {
            if self
                .send_commands(&["QUIT".to_string()], timeout)
                .await
                .is_ok()
            {
                let _ = self.read_reply("the reply to QUIT", timeout).await;
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// Why `body` may not be sent as message data: a NUL, a bare CR or a bare
/// LF (each a smuggling vector for some receiver), or no final CRLF on a
/// non-empty body.
pub fn forbidden_in_data(body: &[u8]) -> Option<&'static str> {
    if body.contains(&0) {
        return Some("the message has a NUL byte");
    }
    if super::has_bare_cr_or_lf(body) {
        return Some("the message has a bare CR or LF");
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        return Some("the message does not end with CRLF");
    }
    None
}

/// The client certificate the relay presents: the node's certificate and
/// key files (PEM), `[gossip] cert` and `key`.
pub type ClientCert<'a> = (&'a Path, &'a Path);

/// Distinct certificate pairs whose configs are kept (one per node config
/// in the process: tests run several nodes in one).
const MAX_CACHED_CONFIGS: usize = 16;

/// The TLS client config for STARTTLS: any server certificate (see
/// [`AnyCertificate`]) and, with `cert`, that client certificate offered to
/// servers that ask for one. Built once per certificate pair and process
/// (the files are read at the first delivery that needs them; a renewed
/// certificate takes a restart, as for gossip). A pair that cannot be read
/// is logged once and the relay goes on without a client certificate:
/// mail still flows, as from a node that has none.
pub fn tls_config(cert: Option<ClientCert<'_>>) -> Arc<rustls::ClientConfig> {
    static NONE: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    type Cache = Vec<((PathBuf, PathBuf), Arc<rustls::ClientConfig>)>;
    static WITH_CERT: Mutex<Cache> = Mutex::new(Vec::new());
    let none = || {
        NONE.get_or_init(|| {
            Arc::new(build(None).expect("the ring provider supports the default TLS versions"))
        })
        .clone()
    };
    let Some((cert, key)) = cert else {
        return none();
    };
    let mut cache = WITH_CERT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|((c, k), _)| c == cert && k == key) {
        return c.clone();
    }
    let config = match with_identity(cert, key) {
        Ok(config) => {
            tracing::info!(cert = %cert.display(), "relay: STARTTLS offers the node certificate to servers that ask for one");
            Arc::new(config)
        }
        Err(e) => {
            tracing::warn!(cert = %cert.display(), key = %key.display(), error = %e, "relay: cannot use the node certificate as TLS client certificate; relaying without one");
            metrics::counter!("magicmx_relay_client_cert_errors_total").increment(1);
            none()
        }
    };
    if cache.len() >= MAX_CACHED_CONFIGS {
        cache.remove(0);
    }
    cache.push(((cert.to_path_buf(), key.to_path_buf()), config.clone()));
    config
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The config presenting the certificate chain in `cert` with `key`.
fn with_identity(cert: &Path, key: &Path) -> Result<rustls::ClientConfig, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    build(Some((chain, key)))
}

fn build(identity: Option<Identity>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)));
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string()),
    }
}

/// Accepts any certificate (opportunistic TLS has no name to check against
/// an MX found through plain DNS), but still checks the handshake
/// signatures, so the session key belongs to whoever holds the certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_bytes_in_data() {
        assert_eq!(forbidden_in_data(b""), None);
        assert_eq!(forbidden_in_data(b"a\r\n.b\r\n"), None);
        assert!(forbidden_in_data(b"a\0b\r\n").is_some());
        assert!(forbidden_in_data(b"a\nb\r\n").is_some());
        assert!(forbidden_in_data(b"a\rb\r\n").is_some());
        assert!(forbidden_in_data(b"ab").is_some());
    }
}
