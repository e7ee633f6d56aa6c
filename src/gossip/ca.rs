//! The network CA: `magicmx ca init --dir DIR` and
//! `magicmx ca issue NAME --dir DIR`.
//!
//! `init` writes `DIR/ca.pem` and `DIR/ca.key` (ECDSA P-256, key file mode
//! 0600); `issue` writes `DIR/NAME.pem` and `DIR/NAME.key`: a certificate
//! for TLS client and server use whose subject CN and DNS names are NAME and
//! [`COMMON_NAME`], signed by the CA. Existing files are never overwritten.
//! The CA's distinguished name is fixed, so `issue` rebuilds the issuer from
//! the key alone, and checks that the new certificate chains to `ca.pem`.
//!
//! `issue` also appends the new certificate's public-key fingerprint and
//! the node's name to `DIR/network_keys` ([`NETWORK_KEYS`]): the file a real
//! MX's policy service pins (`[policy] network_keys`) to let the nodes in by
//! the client certificate they relay with. Certificates carry both the
//! serverAuth and clientAuth extended key usages (they always did, for
//! mutual TLS in gossip), so the same certificate serves for relaying.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};

use super::tls::{verify_chain, COMMON_NAME};
use super::GossipError;

const CA_NAME: &str = "magicmx network CA";

/// File in the CA directory listing every issued node's key fingerprint.
pub const NETWORK_KEYS: &str = "network_keys";

fn ca_err(path: &Path, message: impl std::fmt::Display) -> GossipError {
    GossipError::Ca {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Writes `contents` to a new file (never overwriting), `mode` on Unix.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), GossipError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = o.open(path).map_err(|e| ca_err(path, e))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| ca_err(path, e))?;
    f.sync_all().map_err(|e| ca_err(path, e))
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), GossipError> {
    for p in paths {
        if p.exists() {
            return Err(ca_err(p, "already exists; refusing to overwrite it"));
        }
    }
    Ok(())
}

/// Creates the network CA in `dir` (created if missing).
pub fn init(dir: &Path) -> Result<(), GossipError> {
    std::fs::create_dir_all(dir).map_err(|e| ca_err(dir, e))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate().map_err(|e| ca_err(&key_path, e))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| ca_err(&cert_path, e))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    tracing::info!(dir = %dir.display(), "network CA created");
    Ok(())
}

/// True if `name` can be a node name: a DNS name, not the common name, and
/// usable as a file name.
pub fn valid_node_name(name: &str) -> bool {
    DnsName::try_from(name).is_ok()
        && !name.eq_ignore_ascii_case(COMMON_NAME)
        && !name.starts_with('.')
        && !name.eq_ignore_ascii_case("ca")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Issues a node certificate for `name`, signed by the CA in `dir`.
pub fn issue(name: &str, dir: &Path) -> Result<(), GossipError> {
    if !valid_node_name(name) {
        return Err(GossipError::Config {
            key: "NAME",
            message: format!(
                "{name:?} is not a valid node name (a DNS name of letters, digits, '-', '.'; not {COMMON_NAME:?} or \"ca\")"
            ),
        });
    }
    let (ca_cert_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| ca_err(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| ca_err(&ca_key_path, e))?;
    let ca_cert =
        CertificateDer::from_pem_file(&ca_cert_path).map_err(|e| ca_err(&ca_cert_path, e))?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut params = CertificateParams::new(vec![name.to_string(), COMMON_NAME.to_string()])
        .map_err(|e| ca_err(&cert_path, e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|e| ca_err(&key_path, e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| ca_err(&cert_path, e))?;
    verify_chain(&ca_cert, cert.der(), &[]).map_err(|e| {
        ca_err(
            &ca_cert_path,
            format!("the new certificate does not chain to it ({e}); was it made by `magicmx ca init` with this ca.key?"),
        )
    })?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    let keys_path = dir.join(NETWORK_KEYS);
    let fp = crate::netkeys::of_cert(cert.der())
        .ok_or_else(|| ca_err(&cert_path, "the new certificate does not parse"))?;
    crate::netkeys::append(&keys_path, &fp, name).map_err(|e| ca_err(&keys_path, e))?;
    tracing::info!(node = name, dir = %dir.display(), key = %crate::netkeys::format(&fp), "node certificate issued");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tls::{node_name_of, valid_for, Material};
    use super::*;

    #[test]
    fn init_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(init(dir.path()).is_err(), "never overwrites");
        issue("node1", dir.path()).unwrap();
        assert!(issue("node1", dir.path()).is_err(), "never overwrites");
        assert!(issue(COMMON_NAME, dir.path()).is_err());
        assert!(issue("../x", dir.path()).is_err());
        let m = Material::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("node1.pem"),
            &dir.path().join("node1.key"),
        )
        .unwrap();
        m.check("node1").unwrap();
        assert!(m.check("node2").is_err());
        let leaf = &m.chain[0];
        assert!(valid_for(leaf, "node1"));
        assert!(!valid_for(leaf, "node2"));
        assert!(!valid_for(leaf, COMMON_NAME));
        assert_eq!(node_name_of(leaf).as_deref(), Some("node1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("node1.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A certificate from another CA does not chain.
        let other = tempfile::tempdir().unwrap();
        init(other.path()).unwrap();
        issue("node1", other.path()).unwrap();
        let foreign = Material::load(
            &dir.path().join("ca.pem"),
            &other.path().join("node1.pem"),
            &other.path().join("node1.key"),
        )
        .unwrap();
        assert!(foreign.check("node1").is_err());

        // Each issued node's key is listed in network_keys, under its name.
        issue("node2", dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(NETWORK_KEYS)).unwrap();
        let (keys, bad) = crate::netkeys::parse_file(&text);
        assert!(bad.is_empty(), "{text}");
        assert_eq!(keys.len(), 2, "{text}");
        let fp = crate::netkeys::of_cert(&m.chain[0]).unwrap();
        assert_eq!(keys[&fp], "node1");
        assert!(text.starts_with(&crate::netkeys::format(&fp)), "{text}");
        // Refused issues (existing names) added nothing.
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn node_certificates_are_for_client_and_server_use() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        issue("node1", dir.path()).unwrap();
        let ca = CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap();
        let leaf = CertificateDer::from_pem_file(dir.path().join("node1.pem")).unwrap();
        // Both the clientAuth (relaying, gossip client) and serverAuth EKUs.
        verify_chain(&ca, &leaf, &[]).unwrap();
    }
}
