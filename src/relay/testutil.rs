//! Test helpers for the relay: a tiny SMTP server on 127.0.0.1.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What the sink saw in one session.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    pub(crate) commands: Vec<String>,
    pub(crate) data: Vec<u8>,
    /// The message was sent after a successful STARTTLS.
    pub(crate) tls: bool,
    /// The client certificate presented in the handshake (DER of the leaf).
    pub(crate) client_cert: Option<Vec<u8>>,
}

/// How the sink behaves.
#[derive(Clone)]
pub(crate) enum Mode {
    Plain,
    /// `421` greeting, then close.
    Refuse,
    /// Offers STARTTLS; with no acceptor, answers `220` and hangs up
    /// (the client's handshake fails).
    StartTls(Option<TlsAcceptor>),
}

/// A tiny SMTP server: RCPT to `bad*` gets 550, to `later*` 450, the
/// rest 250.
pub(crate) async fn sink(bind: &str, mode: Mode) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let log = sessions.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let mode = mode.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                if let Mode::Refuse = mode {
                    let mut sock = sock;
                    let _ = sock.write_all(b"421 4.3.2 not now\r\n").await;
                    log.lock().unwrap().push(seen);
                    return;
                }
                let starttls = matches!(mode, Mode::StartTls(_));
                let upgrade = serve(sock, starttls, true, &mut seen).await;
                if let (Some(sock), Mode::StartTls(Some(acceptor))) = (upgrade, mode) {
                    if let Ok(tls) = acceptor.accept(sock).await {
                        seen.tls = true;
                        seen.client_cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.to_vec());
                        serve(tls, false, false, &mut seen).await;
                    }
                }
                log.lock().unwrap().push(seen);
            });
        }
    });
    (port, sessions)
}

/// Runs the session on `stream`; returns the stream when the client asked
/// for STARTTLS.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    offer_tls: bool,
    greet: bool,
    seen: &mut Seen,
) -> Option<S> {
    let mut s = BufReader::new(stream);
    if greet {
        s.write_all(b"220 sink ESMTP\r\n").await.ok()?;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        let cmd = line.trim_end().to_string();
        seen.commands.push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if offer_tls {
                b"250-sink\r\n250-STARTTLS\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
            } else {
                b"250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
            }
        } else if upper == "STARTTLS" && offer_tls {
            s.write_all(b"220 2.0.0 ready\r\n").await.ok()?;
            return Some(s.into_inner());
        } else if upper.starts_with("MAIL") {
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:<BAD") {
            b"550 5.1.1 no such user\r\n"
        } else if upper.starts_with("RCPT TO:<LATER") {
            b"450 4.2.0 try later\r\n"
        } else if upper.starts_with("RCPT") {
            b"250 2.1.5 ok\r\n"
        } else if upper == "DATA" {
            s.write_all(b"354 go ahead\r\n").await.ok()?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if s.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
                    return None;
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(&l);
            }
            seen.data = data;
            b"250 2.0.0 queued as X1\r\n"
        } else if upper == "QUIT" {
            let _ = s.write_all(b"221 2.0.0 bye\r\n").await;
            return None;
        } else {
            b"500 5.5.1 what\r\n"
        };
        s.write_all(reply).await.ok()?;
    }
}

/// A TLS acceptor with a fresh self-signed certificate for `localhost`.
pub(crate) fn tls_acceptor() -> TlsAcceptor {
    tls_acceptor_with(None)
}

/// Like [`tls_acceptor`], and asks for a client certificate (a TLS
/// `CertificateRequest`, as Postfix with `smtpd_tls_ask_ccert = yes`): one
/// that chains to `ca` (DER) is accepted, and so is a client without one.
pub(crate) fn tls_acceptor_asking(ca: &[u8]) -> TlsAcceptor {
    tls_acceptor_with(Some(ca))
}

fn tls_acceptor_with(ca: Option<&[u8]>) -> TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(ca.to_vec())).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(vec![cert], key).unwrap();
    TlsAcceptor::from(Arc::new(config))
}
