//! The signed envelope (DESIGN §2): base64 payload plus named ed25519 signatures.
//!
//! Signatures cover a context line and the exact transmitted payload bytes, never a
//! re-serialisation, so a manifest cannot be replayed as a report or vice versa.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::keys::{SecretKey, TrustedKeys};

/// A reader refuses envelopes larger than this before parsing them.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// What a signature is for; its line is prepended to the payload before signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `roost/manifest/v1`
    Manifest,
    /// `roost/report/v1`
    Report,
    /// `roost/reboot-lease/v1`
    RebootLease,
}

impl Context {
    /// The context line, newline included.
    pub fn line(self) -> &'static [u8] {
        match self {
            Context::Manifest => b"roost/manifest/v1\n",
            Context::Report => b"roost/report/v1\n",
            Context::RebootLease => b"roost/reboot-lease/v1\n",
        }
    }

    fn message(self, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.line().len() + payload.len());
        m.extend_from_slice(self.line());
        m.extend_from_slice(payload);
        m
    }
}

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The signing key's name.
    pub key: String,
    /// base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// The envelope as transmitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// base64 (standard, padded) of the payload bytes.
    pub payload: String,
    /// Signatures over context line ‖ payload bytes.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// Signs `payload` with every key in `keys`.
    pub fn seal(context: Context, payload: &[u8], keys: &[&SecretKey]) -> Self {
        let message = context.message(payload);
        Self {
            payload: STANDARD.encode(payload),
            signatures: keys
                .iter()
                .map(|k| Signature {
                    key: k.name().to_owned(),
                    sig: STANDARD.encode(k.sign(&message)),
                })
                .collect(),
        }
    }

    /// The payload of envelope `bytes` with no check at all: only to describe what was
    /// refused (the version a refused manifest claims), never to act on it.
    pub fn unverified_payload(bytes: &[u8]) -> Option<Vec<u8>> {
        let env: Envelope = serde_json::from_slice(bytes).ok()?;
        STANDARD.decode(env.payload).ok()
    }

    /// The envelope's JSON bytes, as uploaded and stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("an envelope always serialises");
        v.push(b'\n');
        v
    }
}

/// Why an envelope was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Size received.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// Not the JSON shape of an envelope.
    #[error("envelope is not valid JSON of the form {{\"payload\", \"signatures\"}}: {0}")]
    Malformed(String),
    /// `payload` is not standard padded base64.
    #[error("envelope payload is not valid base64")]
    PayloadBase64,
    /// Fewer distinct trusted keys signed than required.
    #[error(
        "{valid} valid signature(s) from trusted keys, {threshold} required{}{}",
        if invalid.is_empty() { String::new() } else { format!("; signature does not verify for key(s): {}", invalid.join(", ")) },
        if unknown.is_empty() { String::new() } else { format!("; untrusted key(s): {}", unknown.join(", ")) }
    )]
    NotEnoughSignatures {
        /// Distinct trusted keys with a valid signature.
        valid: usize,
        /// How many are required.
        threshold: usize,
        /// Trusted key names whose signature failed to verify.
        invalid: Vec<String>,
        /// Key names that are not trusted.
        unknown: Vec<String>,
    },
}

/// An opened envelope: the payload bytes that enough trusted keys signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The exact signed payload bytes.
    pub payload: Vec<u8>,
    /// Names of the trusted keys whose signatures verified.
    pub signed_by: Vec<String>,
}

/// Opens `bytes`: size cap, JSON, base64, then at least `threshold` distinct trusted keys.
pub fn open(
    bytes: &[u8],
    context: Context,
    trusted: &TrustedKeys,
) -> Result<Opened, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    let payload = STANDARD
        .decode(&env.payload)
        .map_err(|_| EnvelopeError::PayloadBase64)?;
    let message = context.message(&payload);
    let mut good = BTreeSet::new();
    let mut invalid = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    for s in &env.signatures {
        let Some(key) = trusted.get(&s.key) else {
            unknown.insert(s.key.clone());
            continue;
        };
        let ok = STANDARD
            .decode(&s.sig)
            .is_ok_and(|sig| key.verify(&message, &sig));
        if ok {
            good.insert(s.key.clone());
        } else {
            invalid.insert(s.key.clone());
        }
    }
    if good.len() < trusted.threshold() {
        invalid.retain(|k| !good.contains(k));
        return Err(EnvelopeError::NotEnoughSignatures {
            valid: good.len(),
            threshold: trusted.threshold(),
            invalid: invalid.into_iter().collect(),
            unknown: unknown.into_iter().collect(),
        });
    }
    Ok(Opened {
        payload,
        signed_by: good.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SecretKey, SecretKey) {
        (
            SecretKey::generate("a").unwrap(),
            SecretKey::generate("b").unwrap(),
        )
    }

    #[test]
    fn seal_then_open_returns_exact_payload() {
        let (a, _) = keys();
        let env = Envelope::seal(Context::Manifest, b"{\"x\":1}", &[&a]);
        let opened = open(
            &env.to_bytes(),
            Context::Manifest,
            &TrustedKeys::new([a.public()], 1),
        )
        .unwrap();
        assert_eq!(opened.payload, b"{\"x\":1}");
        assert_eq!(opened.signed_by, vec!["a".to_owned()]);
    }

    #[test]
    fn the_same_key_twice_counts_once() {
        let (a, b) = keys();
        let env = Envelope::seal(Context::Manifest, b"p", &[&a, &a]);
        let trusted = TrustedKeys::new([a.public(), b.public()], 2);
        assert!(matches!(
            open(&env.to_bytes(), Context::Manifest, &trusted),
            Err(EnvelopeError::NotEnoughSignatures {
                valid: 1,
                threshold: 2,
                ..
            })
        ));
    }

    #[test]
    fn a_bad_signature_beside_a_valid_one_is_ignored() {
        let (a, b) = keys();
        let mut env = Envelope::seal(Context::Manifest, b"p", &[&a, &b]);
        env.signatures[1].sig = STANDARD.encode([0u8; 64]);
        env.signatures.push(Signature {
            key: "stranger".into(),
            sig: "AAAA".into(),
        });
        let trusted = TrustedKeys::new([a.public(), b.public()], 1);
        assert!(open(&env.to_bytes(), Context::Manifest, &trusted).is_ok());
    }

    #[test]
    fn a_report_signature_does_not_open_as_a_manifest() {
        let (a, _) = keys();
        let env = Envelope::seal(Context::Report, b"p", &[&a]);
        let err = open(
            &env.to_bytes(),
            Context::Manifest,
            &TrustedKeys::new([a.public()], 1),
        )
        .unwrap_err();
        assert!(
            matches!(err, EnvelopeError::NotEnoughSignatures { valid: 0, ref invalid, .. } if invalid == &["a"])
        );
    }
}
