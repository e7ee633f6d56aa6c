//! Test helpers for the relay: the crate's sink ([`crate::demo::sink`])
//! scripted as the real MX of the relay's unit tests, and TLS server
//! configurations for it.
#![cfg(test)]

use std::sync::Arc;

use crate::demo::sink::SinkBuilder;

/// The real MX of the unit tests: RCPT to `bad*` gets 550, to `later*`
/// 450, the rest 250; each message is "queued as X1".
pub(crate) fn real_mx() -> SinkBuilder {
    SinkBuilder::default()
        .rcpt_rule(|a| {
            let a = a.to_ascii_lowercase();
            if a.starts_with("bad") {
                Some("550 5.1.1 no such user".into())
            } else if a.starts_with("later") {
                Some("450 4.2.0 try later".into())
            } else {
                None
            }
        })
        .data_reply("250 2.0.0 queued as X1")
}

/// A TLS server configuration with a fresh self-signed certificate for
/// `localhost`.
pub(crate) fn tls_server() -> Arc<rustls::ServerConfig> {
    tls_server_with(None)
}

/// Like [`tls_server`], and asks for a client certificate (a TLS
/// `CertificateRequest`, as Postfix with `smtpd_tls_ask_ccert = yes`): one
/// that chains to `ca` (DER) is accepted, and so is a client without one.
pub(crate) fn tls_server_asking(ca: &[u8]) -> Arc<rustls::ServerConfig> {
    tls_server_with(Some(ca))
}

fn tls_server_with(ca: Option<&[u8]>) -> Arc<rustls::ServerConfig> {
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
    Arc::new(builder.with_single_cert(vec![cert], key).unwrap())
}
