//! The mesh certificate authority: a root (self-signed, or supplied by the user) that signs
//! workload certificates from CSRs and the operator's own serving certificates.
//!
//! What a workload certificate says is decided here and nowhere else: the CSR only contributes
//! its public key (after its signature proves possession of the private key). Its subject,
//! SANs, key usages and any other extension are ignored, and the only name in the certificate
//! is the SPIFFE ID the caller proved with a TokenReview.
//!
//! Key policy: workload keys must be ECDSA P-256. That is the mesh's one key type (see
//! DESIGN.md: several times more handshakes per second than RSA-2048, and the sidecar always
//! generates P-256), so every other key (RSA of any size, P-384, Ed25519) is refused with a
//! clear reason instead of carrying a second code path nobody uses. A user-supplied CA key may
//! be any type rcgen signs with (ECDSA P-256/P-384, RSA >= 2048 in PKCS#8): cert-manager issues
//! RSA CAs by default and the CA key type does not affect handshake cost much.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// How far certificates are backdated, so a peer whose clock is slightly behind ours does not
/// see a certificate that is "not yet valid".
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not be built or refused to sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA certificate: {0}")]
    CaCertificate(String),
    #[error("CA private key: {0}")]
    CaKey(String),
    #[error("the CA private key does not match the CA certificate")]
    CaKeyMismatch,
    #[error("the CA certificate is not a CA (basicConstraints cA=false or missing)")]
    NotACa,
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR signature does not verify (the requester must hold the private key)")]
    CsrSignature,
    #[error("weak or unsupported key: {0}; workload keys must be ECDSA P-256")]
    WeakKey(String),
    #[error("invalid identity {0:?}")]
    InvalidIdentity(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

impl CaError {
    /// Short stable label for metrics (`rejections{reason=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            CaError::MalformedCsr(_) => "malformed_csr",
            CaError::CsrSignature => "csr_signature",
            CaError::WeakKey(_) => "weak_key",
            CaError::InvalidIdentity(_) => "invalid_identity",
            _ => "ca_error",
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf, DER.
    pub cert_der: CertificateDer<'static>,
    /// Serial number, lowercase hex (for audit logs).
    pub serial_hex: String,
    /// Expiry of the leaf.
    pub not_after: SystemTime,
}

/// The signing CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    /// Certificates between the signing cert and a root, to send along with every leaf
    /// (includes the signing cert itself when it is not a self-signed root).
    intermediates_pem: String,
    /// Roots only, PEM: what peers trust.
    roots_pem: String,
    fingerprint: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn asn1_to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// PEM-encode one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// Parses every certificate in a PEM string.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::CaCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(CaError::CaCertificate("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and exactly 16 bytes of entropy-bearing content.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Validity and basic facts of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub fingerprint: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub self_signed: bool,
    pub is_ca: bool,
}

/// Reads a certificate's validity, CA flag and fingerprint.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CaError> {
    let (_, x) =
        X509Certificate::from_der(der).map_err(|e| CaError::CaCertificate(e.to_string()))?;
    let is_ca = x
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        fingerprint: fingerprint(der),
        not_before: asn1_to_system(x.validity().not_before),
        not_after: asn1_to_system(x.validity().not_after),
        self_signed: x.subject() == x.issuer(),
        is_ca,
    })
}

/// Longest root validity [`CertificateAuthority::generate`] accepts: 1000 years keeps every
/// date inside what X.509 and the `time` crate represent (year 9999), so a huge validity is an
/// error, never a panic. The Mesh allows at most 100 years.
pub const MAX_VALIDITY: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root valid for `validity` from `now` (backdated by
    /// [`CLOCK_SKEW_BACKDATE`]). No name constraints: webpki refuses URI name constraints.
    pub fn generate(
        trust_domain: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        // A distinct subject per root: during a rotation two roots coexist in every bundle, and
        // chain building picks candidate issuers by subject name.
        let id: [u8; 4] = rand::random();
        dn.push(
            DnType::CommonName,
            format!("Trellis root CA {trust_domain} {}", hex::encode(id)),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(random_serial());
        p.not_before = to_offset(now - CLOCK_SKEW_BACKDATE);
        p.not_after = to_offset(
            now.checked_add(validity)
                .filter(|_| validity <= MAX_VALIDITY)
                .ok_or_else(|| {
                    CaError::Signing(format!(
                        "root validity {validity:?} is longer than the {MAX_VALIDITY:?} a certificate can carry"
                    ))
                })?,
        );
        let cert = p
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Self::from_pem(&cert.pem(), &key.serialize_pem(), None)
    }

    /// Loads a CA from PEM: `tls.crt` (signing cert first, then any intermediates), `tls.key`
    /// (PKCS#8), and optionally `ca.crt` (the roots to publish; required when the signing cert
    /// is an intermediate). This is the layout cert-manager writes.
    pub fn from_pem(tls_crt: &str, tls_key: &str, ca_crt: Option<&str>) -> Result<Self, CaError> {
        let chain = parse_certs(tls_crt)?;
        let cert_der = chain[0].clone();
        let info = cert_info(&cert_der)?;
        if !info.is_ca {
            return Err(CaError::NotACa);
        }
        let key = KeyPair::from_pem(tls_key).map_err(|e| {
            CaError::CaKey(format!(
                "{e} (expected an unencrypted PKCS#8 key; with cert-manager set privateKey.encoding: PKCS8)"
            ))
        })?;
        let (_, x) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::CaCertificate(e.to_string()))?;
        if x.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CaError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::CaCertificate(e.to_string()))?;

        let mut intermediates_pem = String::new();
        let mut roots_pem = String::new();
        for c in &chain {
            if cert_info(c)?.self_signed {
                roots_pem.push_str(&cert_pem(c));
            } else {
                intermediates_pem.push_str(&cert_pem(c));
            }
        }
        if let Some(extra) = ca_crt.filter(|s| !s.trim().is_empty()) {
            // ca.crt names the roots explicitly; it replaces any self-signed certs in tls.crt.
            roots_pem = parse_certs(extra)?.iter().map(|c| cert_pem(c)).collect();
        }
        if roots_pem.is_empty() {
            return Err(CaError::CaCertificate(
                "the signing certificate is an intermediate and no ca.crt names its root".into(),
            ));
        }
        Ok(Self {
            issuer,
            cert_pem: cert_pem(&cert_der),
            key_pem: tls_key.to_string(),
            cert_der,
            intermediates_pem,
            roots_pem,
            fingerprint: info.fingerprint,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// SHA-256 fingerprint of the signing certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
    /// The signing certificate, PEM (`tls.crt` of the CA Secret).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// The signing key, PEM (`tls.key` of the CA Secret). Never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    /// The roots this CA chains to, PEM.
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }
    /// Intermediates to send after each leaf (empty for a self-signed root).
    pub fn intermediates_pem(&self) -> &str {
        &self.intermediates_pem
    }

    /// Signs a workload certificate for `spiffe_id` from a PEM CSR.
    ///
    /// Only the CSR's public key is used, after its signature verifies. Everything else the
    /// certificate says is set here: the SAN is exactly `spiffe_id`, key usages are
    /// digitalSignature + keyEncipherment, extended key usages serverAuth + clientAuth, not a
    /// CA, valid from `now - 60s` for `ttl` (capped at the CA's own expiry).
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let public_key = verified_csr_key(csr_pem)?;
        if !trellis_proxy::config::is_spiffe_id(spiffe_id) {
            return Err(CaError::InvalidIdentity(spiffe_id.to_string()));
        }
        let uri = spiffe_id
            .try_into()
            .map_err(|_| CaError::InvalidIdentity(spiffe_id.to_string()))?;
        let mut p = CertificateParams::default();
        // Empty subject: the identity is the SAN (rcgen marks the SAN critical then, RFC 5280).
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
        self.sign(p, &public_key, ttl, now)
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        // Capped at the CA's own expiry; an absurd `ttl` cannot overflow past it.
        let not_after = now
            .checked_add(ttl)
            .map_or(self.not_after, |t| t.min(self.not_after));
        p.serial_number = Some(random_serial());
        p.not_before = to_offset(now - CLOCK_SKEW_BACKDATE);
        p.not_after = to_offset(not_after);
        let cert = p
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let serial_hex = hex::encode(
            p.serial_number
                .as_ref()
                .map(|s| s.to_bytes())
                .unwrap_or_default(),
        );
        // Whole seconds, as the certificate encodes them.
        let not_after = UNIX_EPOCH
            + Duration::from_secs(
                not_after
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            );
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            serial_hex,
            not_after,
        })
    }

    /// Issues a TLS serving certificate (serverAuth, DNS SANs) with a fresh ECDSA P-256 key.
    /// Returns the issued leaf and the key in PKCS#8 PEM.
    pub fn issue_serving_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut p = CertificateParams::new(dns_names.to_vec())
            .map_err(|e| CaError::InvalidIdentity(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
        let issued = self.sign(p, &key, ttl, now)?;
        Ok((issued, key.serialize_pem()))
    }
}

/// The names a CSR asks for (its SAN extension), as `uri:`, `dns:`, `ip:`, `email:` or
/// `other:` strings. The CA never copies them; the identity endpoint uses this only to refuse a
/// request that asks for something other than the caller's own identity.
pub fn csr_requested_names(csr_pem: &str) -> Result<Vec<String>, CaError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::MalformedCsr(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                names.push(match n {
                    GeneralName::URI(u) => format!("uri:{u}"),
                    GeneralName::DNSName(d) => format!("dns:{d}"),
                    GeneralName::RFC822Name(e) => format!("email:{e}"),
                    GeneralName::IPAddress(ip) => format!("ip:{}", hex::encode(ip)),
                    other => format!("other:{other:?}"),
                });
            }
        }
    }
    Ok(names)
}

/// Parses a PEM CSR, verifies its self-signature, and returns its public key if it is P-256.
pub fn verified_csr_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, CaError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::MalformedCsr(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::MalformedCsr("trailing bytes after the CSR".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    // Check the key type before the signature: a clearer error for RSA/P-384 requests.
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            return Err(CaError::WeakKey(format!("RSA-{} key", rsa.key_size())));
        }
        Ok(PublicKey::EC(_)) => {}
        Ok(_) | Err(_) => {
            return Err(CaError::WeakKey(format!(
                "key algorithm {}",
                spki.algorithm.algorithm
            )));
        }
    }
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CaError::WeakKey(format!("EC key not supported: {e}")))?;
    if rcgen::PublicKeyData::algorithm(&key) != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::WeakKey(
            "EC key on a curve other than P-256".into(),
        ));
    }
    csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

    fn csr_with(key: &KeyPair, sans: Vec<String>) -> String {
        let mut p = CertificateParams::new(sans).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(
            "cluster.local",
            Duration::from_secs(3600 * 24 * 365),
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn a_huge_validity_is_an_error_not_a_panic() {
        let now = SystemTime::now();
        for validity in [MAX_VALIDITY + Duration::from_secs(1), Duration::MAX] {
            let e = CertificateAuthority::generate("td", validity, now).unwrap_err();
            assert!(e.to_string().contains("longer than"), "{e}");
        }
        // Signing with an absurd TTL is capped at the CA's expiry.
        let ca = CertificateAuthority::generate("td", Duration::from_secs(7200), now).unwrap();
        let (_, csr) = {
            let key = rcgen::KeyPair::generate().unwrap();
            let pem = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            (key, pem)
        };
        let issued = ca
            .sign_workload_csr(&csr, "spiffe://td/ns/a/sa/b", Duration::MAX, now)
            .unwrap();
        assert_eq!(issued.not_after, ca.not_after());
    }

    #[test]
    fn generated_root_is_a_p256_ca_with_validity_and_fingerprint() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(7200), now)
            .unwrap();
        let info = cert_info(ca.cert_der()).unwrap();
        assert!(info.is_ca && info.self_signed);
        assert_eq!(ca.fingerprint().len(), 64);
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(ca.not_after()), secs(now + Duration::from_secs(7200)));
        assert_eq!(ca.roots_pem(), ca.cert_pem());
        assert!(ca.intermediates_pem().is_empty());
        let (_, x) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert!(
            x.name_constraints().unwrap().is_none(),
            "webpki refuses URI name constraints"
        );
        // The Secret round-trip gives the same CA.
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem(), None).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn signed_leaf_ignores_csr_names_and_extensions() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let csr = csr_with(
            &key,
            vec![
                "evil.example.com".into(),
                "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
            ],
        );
        let now = SystemTime::now();
        let issued = ca
            .sign_workload_csr(&csr, ID, Duration::from_secs(3600), now)
            .unwrap();
        let (_, x) = X509Certificate::from_der(&issued.cert_der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "empty subject needs a critical SAN");
        assert_eq!(san.value.general_names, vec![GeneralName::URI(ID)]);
        assert!(x.subject().iter().next().is_none());
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        // The public key is the CSR's.
        assert_eq!(
            x.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        // Backdated a minute; lifetime as asked.
        let nb = asn1_to_system(x.validity().not_before);
        let na = asn1_to_system(x.validity().not_after);
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(nb), secs(now - CLOCK_SKEW_BACKDATE));
        assert_eq!(secs(na), secs(now + Duration::from_secs(3600)));
        assert_eq!(issued.not_after, UNIX_EPOCH + Duration::from_secs(secs(na)));
        // Every extension is one we set.
        for ext in x.extensions() {
            assert!(
                matches!(
                    ext.parsed_extension(),
                    ParsedExtension::SubjectAlternativeName(_)
                        | ParsedExtension::KeyUsage(_)
                        | ParsedExtension::ExtendedKeyUsage(_)
                        | ParsedExtension::BasicConstraints(_)
                        | ParsedExtension::AuthorityKeyIdentifier(_)
                        | ParsedExtension::SubjectKeyIdentifier(_)
                ),
                "unexpected extension {:?}",
                ext.oid
            );
        }
        // And it chains to the root.
        x.verify_signature(Some(
            X509Certificate::from_der(ca.cert_der())
                .unwrap()
                .1
                .public_key(),
        ))
        .unwrap();
    }

    #[test]
    fn leaf_lifetime_is_capped_at_ca_expiry() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("td", Duration::from_secs(600), now).unwrap();
        let csr = csr_with(&KeyPair::generate().unwrap(), vec![]);
        let issued = ca
            .sign_workload_csr(&csr, ID, Duration::from_secs(86400), now)
            .unwrap();
        assert!(issued.not_after <= ca.not_after());
    }

    #[test]
    fn refuses_weak_keys_malformed_and_forged_csrs() {
        let ca = ca();
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let csr = csr_with(&KeyPair::generate_for(alg).unwrap(), vec![]);
            let err = ca.sign_workload_csr(&csr, ID, ttl, now).unwrap_err();
            assert!(matches!(err, CaError::WeakKey(_)), "{err}");
        }
        for bad in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = ca.sign_workload_csr(bad, ID, ttl, now).unwrap_err();
            assert!(matches!(err, CaError::MalformedCsr(_)), "{bad:?}: {err}");
        }
        // Flip a byte in the signature: possession is not proven.
        let csr = csr_with(&KeyPair::generate().unwrap(), vec![]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let n = der.len();
        der[n - 3] ^= 0x01;
        let forged = pem_block("CERTIFICATE REQUEST", &der);
        let err = ca.sign_workload_csr(&forged, ID, ttl, now).unwrap_err();
        assert!(
            matches!(err, CaError::CsrSignature | CaError::MalformedCsr(_)),
            "{err}"
        );
        // Not a SPIFFE ID.
        let err = ca
            .sign_workload_csr(&csr, "https://x", ttl, now)
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidIdentity(_)));
    }

    #[test]
    fn refuses_rsa_csr() {
        // RSA key generation is not in ring; a committed RSA-2048 CSR (openssl req -new
        // -newkey rsa:2048 -nodes -subj /CN=x) stands in. See testdata/README.md.
        let csr = include_str!("testdata/rsa2048.csr");
        let err = ca()
            .sign_workload_csr(csr, ID, Duration::from_secs(60), SystemTime::now())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "weak or unsupported key: RSA-2048 key; workload keys must be ECDSA P-256"
        );
    }

    #[test]
    fn loads_user_ca_with_intermediate_and_ca_crt() {
        let now = SystemTime::now();
        let root = ca();
        // The root signs an intermediate the user hands us as tls.crt + tls.key + ca.crt.
        let ikey = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let icert = root.sign(p, &ikey, Duration::from_secs(3600), now).unwrap();
        let err = CertificateAuthority::from_pem(&icert.cert_pem, &ikey.serialize_pem(), None)
            .unwrap_err();
        assert!(err.to_string().contains("no ca.crt"), "{err}");
        let user = CertificateAuthority::from_pem(
            &icert.cert_pem,
            &ikey.serialize_pem(),
            Some(root.cert_pem()),
        )
        .unwrap();
        assert_eq!(user.roots_pem(), root.cert_pem());
        assert_eq!(user.intermediates_pem(), icert.cert_pem);
        // Wrong key, not a CA, garbage.
        let other = KeyPair::generate().unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(root.cert_pem(), &other.serialize_pem(), None),
            Err(CaError::CaKeyMismatch)
        ));
        let leaf = root
            .sign_workload_csr(&csr_with(&other, vec![]), ID, Duration::from_secs(60), now)
            .unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf.cert_pem, &other.serialize_pem(), None),
            Err(CaError::NotACa)
        ));
        assert!(CertificateAuthority::from_pem("junk", "junk", None).is_err());
    }

    #[test]
    fn serving_cert_has_dns_names_and_server_auth() {
        let ca = ca();
        let names = vec!["trellis-operator.trellis-system.svc".to_string()];
        let (issued, key_pem) = ca
            .issue_serving_cert(&names, Duration::from_secs(3600), SystemTime::now())
            .unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let (_, x) = X509Certificate::from_der(&issued.cert_der).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName("trellis-operator.trellis-system.svc")]
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    }
}
