//! TLS for the `tls` (MQTTS) and `wss` listeners: loading the certificate, key and
//! optional client CA from PEM files into a rustls server configuration, and reading
//! the Common Name of a verified client certificate.
//!
//! Owns no connection and no task: [`acceptor`] runs once at start-up (a bad file
//! stops the node with a message naming the file), and the listener drives each
//! handshake on the connection's IO arbiter, bounded by `mqtt.connect_timeout_secs`
//! and by the listener's `max_connections` slots, which a connection holds from accept
//! on, handshake included. That slot cap is the back-pressure: handshakes in progress
//! count against it, so a flood of slow handshakes cannot grow without bound.
//!
//! Crypto provider: aws-lc-rs (tokio-rustls' default), named explicitly so that the
//! result does not depend on which provider features other crates switch on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{what} {file}: {problem}")]
    File {
        /// Which file: "certificate file", "key file" or "CA file".
        what: &'static str,
        /// Its path, as configured.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be turned into a verifier.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_error(what: &'static str, file: &Path, problem: impl ToString) -> TlsError {
    TlsError::File {
        what,
        file: file.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// Read every certificate of a PEM file; an empty file is an error.
fn certificates(what: &'static str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| file_error(what, file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, file, e))?;
    if certs.is_empty() {
        return Err(file_error(what, file, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// The server configuration for `files`: TLS 1.2 and 1.3 with the provider's safe
/// defaults, the certificate chain and key, and, with a `ca_file`, a verifier that
/// requires a client certificate chaining to one of its CAs.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates("certificate file", &files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| file_error("key file", &files.key_file, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("CA file", ca_file)? {
                roots
                    .add(ca)
                    .map_err(|e| file_error("CA file", ca_file, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(builder.with_single_cert(chain, key)?)
}

/// A handshake driver for `files` (see [`server_config`]).
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(Arc::new(server_config(files)?)))
}

/// The first Common Name (OID 2.5.4.3) of the subject of a DER certificate, if it has
/// one as a UTF8String, PrintableString, IA5String or TeletexString.
///
/// A few lines of DER walking instead of an X.509 crate: the certificate has already
/// been verified by rustls, only the subject is read, and every length is checked, so
/// malformed input gives `None`, never a panic.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, certificate, _) = tlv(cert)?;
    let (_, mut tbs, _) = tlv(certificate)?;
    // version [0] EXPLICIT is optional.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity; then subject.
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (tag, mut rdns, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    while !rdns.is_empty() {
        let (_, mut set, rest) = tlv(rdns)?;
        rdns = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = tlv(attribute)?;
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (value_tag, value, _) = tlv(value)?;
                if matches!(value_tag, 0x0c | 0x13 | 0x16 | 0x14) {
                    return std::str::from_utf8(value).ok().map(str::to_owned);
                }
            }
        }
    }
    None
}

/// Split one DER TLV off `data`: (tag, contents, rest). Only single-byte tags (all
/// that X.509 uses) and definite lengths of up to 4 bytes.
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, data) = data.split_first()?;
    let (&first, mut data) = data.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || data.len() < n {
            return None;
        }
        let len = data[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        data = &data[n..];
        len
    };
    if data.len() < len {
        return None;
    }
    let (contents, rest) = data.split_at(len);
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_rejects_truncated_and_oversized_lengths() {
        assert_eq!(tlv(&[]), None);
        assert_eq!(tlv(&[0x30]), None);
        assert_eq!(tlv(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(tlv(&[0x30, 0x80]), None);
        assert_eq!(
            tlv(&[0x04, 0x81, 0x01, 9, 7]),
            Some((0x04, &[9u8][..], &[7u8][..]))
        );
    }

    #[test]
    fn common_name_of_a_real_certificate() {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(DnType::CommonName, "sensor-7");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("sensor-7"));

        let params = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        let mut params = params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None, "no CN");

        // Every truncation of a real certificate is handled without a panic.
        let der = cert.der().to_vec();
        for n in 0..der.len() {
            let _ = common_name(&der[..n]);
        }
    }

    #[test]
    fn loading_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = TlsFiles {
            cert_file: empty.clone(),
            key_file: empty.clone(),
            ca_file: None,
            cn_as_username: false,
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(
            err.starts_with("certificate file ") && err.contains("empty.pem"),
            "{err}"
        );

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.path().join("c.pem");
        let key_file = dir.path().join("k.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let ok = TlsFiles {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            ca_file: None,
            cn_as_username: false,
        };
        server_config(&ok).unwrap();
        let err = server_config(&TlsFiles {
            key_file: empty.clone(),
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("key file "), "{err}");
        let err = server_config(&TlsFiles {
            ca_file: Some(empty),
            ..ok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("CA file "), "{err}");
        server_config(&TlsFiles {
            ca_file: Some(cert_file),
            ..ok
        })
        .unwrap();
    }

    #[test]
    fn common_name_of_garbage_is_none() {
        assert_eq!(common_name(b""), None);
        assert_eq!(common_name(b"not a certificate at all"), None);
        assert_eq!(common_name(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
