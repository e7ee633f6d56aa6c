//! Mutual TLS for the gossip endpoint (TLS 1.3 only, ring provider).
//!
//! Every node certificate is signed by the network CA and carries two DNS
//! names: the node's name and the common name [`COMMON_NAME`]. The server
//! requires a client certificate chaining to the CA; the client verifies the
//! server against the CA with [`COMMON_NAME`] as server name, so it can dial
//! a seed known only by address. The node's identity is then the name in
//! the peer's certificate: a message whose claimed sender is not valid for
//! the certificate of its connection is dropped ([`valid_for`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use super::GossipError;

/// The DNS name every node certificate carries besides the node's own
/// name; the TLS server name when dialing a peer. Not a valid node name.
pub const COMMON_NAME: &str = "magicmx-node";
/// ALPN protocol of the gossip endpoint.
pub const ALPN: &[u8] = b"magicmx-gossip/1";

/// This node's TLS material, as read from `[gossip] ca`, `cert`, `key`.
pub struct Material {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn tls_err(key: &'static str, e: impl std::fmt::Display) -> GossipError {
    GossipError::Config {
        key,
        message: e.to_string(),
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Material, GossipError> {
        let ca = CertificateDer::from_pem_file(ca)
            .map_err(|e| tls_err("gossip.ca", format!("{}: {e}", ca.display())))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| tls_err("gossip.cert", format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(tls_err(
                "gossip.cert",
                format!("{}: no certificate in the file", cert.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| tls_err("gossip.key", format!("{}: {e}", key.display())))?;
        Ok(Material { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, GossipError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| tls_err("gossip.ca", e))?;
        Ok(Arc::new(roots))
    }

    /// Checks that this node's own certificate chains to the CA and names
    /// `node_name`, so that a misconfiguration fails at start, not at the
    /// first peer.
    pub fn check(&self, node_name: &str) -> Result<(), GossipError> {
        let leaf = &self.chain[0];
        verify_chain(&self.ca, leaf, &self.chain[1..]).map_err(|e| {
            tls_err(
                "gossip.cert",
                format!("the certificate does not chain to gossip.ca: {e}"),
            )
        })?;
        if node_name_of(leaf).as_deref() != Some(node_name) {
            return Err(tls_err(
                "gossip.cert",
                format!("the certificate is not valid for node.name {node_name:?} (issue one with `magicmx ca issue {node_name}`)"),
            ));
        }
        Ok(())
    }

    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, GossipError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| tls_err("gossip.ca", e))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("gossip.cert", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("gossip.key", e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| tls_err("gossip.cert", e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport);
        config.migration(false);
        Ok(config)
    }

    pub fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, GossipError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("gossip.cert", e))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("gossip.key", e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| tls_err("gossip.cert", e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport);
        Ok(config)
    }
}

/// Transport limits of every gossip connection.
pub fn transport_config(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(32u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    let idle = idle.clamp(Duration::from_secs(1), Duration::from_secs(60));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(idle / 3));
    t.datagram_receive_buffer_size(Some(512 * 1024));
    Arc::new(t)
}

/// True if `name` is a valid node name and `cert` is valid for it.
pub fn valid_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    if name.eq_ignore_ascii_case(COMMON_NAME) {
        return false;
    }
    let Ok(dns) = DnsName::try_from(name) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&ServerName::DnsName(dns.to_owned()))
        .is_ok()
}

/// The node name a (verified) certificate carries: its first DNS name other
/// than [`COMMON_NAME`], checked with [`valid_for`].
pub fn node_name_of(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = ee
        .valid_dns_names()
        .find(|n| !n.eq_ignore_ascii_case(COMMON_NAME) && !n.starts_with('*'))?
        .to_string();
    valid_for(cert, &name).then_some(name)
}

/// The end-entity certificate the peer of a connection presented.
pub fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// Verifies that `leaf` chains to `ca` for both TLS client and server use
/// (server name [`COMMON_NAME`]).
pub fn verify_chain(
    ca: &CertificateDer<'static>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| e.to_string())?;
    let roots = Arc::new(roots);
    let now = rustls::pki_types::UnixTime::now();
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?;
    client
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("as a client certificate: {e}"))?;
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(COMMON_NAME).map_err(|e| e.to_string())?;
    server
        .verify_server_cert(leaf, intermediates, &name, &[], now)
        .map_err(|e| format!("as a server certificate: {e}"))?;
    Ok(())
}
