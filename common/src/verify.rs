//! The one place every manifest rule of DESIGN §3 is enforced.
//!
//! [`verify_manifest`] is pure: envelope bytes, trust, the stored floor, the trusted now and
//! the node's identity in; an accepted manifest or a [`Rejection`] naming the broken rule out.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{self, Context, EnvelopeError};
use crate::keys::TrustedKeys;
use crate::names::{NodeName, Version};
use crate::time::Timestamp;
use crate::wire::v1::{self, Manifest};

/// The highest version a node ever accepted and the digest of that payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// The version.
    pub version: Version,
    /// SHA-256 of the accepted payload bytes, hex.
    #[serde(with = "hex32")]
    pub digest: [u8; 32],
}

/// Who is verifying: the node's name and Nix system.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The agent's node name.
    pub node: &'a NodeName,
    /// The node's Nix system.
    pub system: &'a str,
}

/// A manifest that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// The exact signed payload bytes.
    pub payload: Vec<u8>,
    /// SHA-256 of `payload`; becomes the new floor's digest.
    pub digest: [u8; 32],
    /// Trusted keys that signed it.
    pub signed_by: Vec<String>,
}

impl Verified {
    /// The floor to store once this manifest is accepted.
    pub fn floor(&self) -> Floor {
        Floor {
            version: self.manifest.version,
            digest: self.digest,
        }
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// A newer manifest.
    New(Box<Verified>),
    /// The same version with identical payload bytes as the floor: nothing to do.
    Unchanged(Version),
}

/// Why a manifest was refused. Each variant is one rule of DESIGN §3.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Size, JSON shape, base64, or signatures.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The payload is not the JSON of a v1 manifest.
    #[error("manifest payload is invalid at `{path}`: {message}")]
    Payload {
        /// Where in the payload (`profiles[0].path`), `.` for the top.
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// `format` is not 1.
    #[error("manifest format {0} is not supported (this agent reads format 1)")]
    UnsupportedFormat(u64),
    /// Meant for another node.
    #[error("manifest is for node `{got}`, this node is `{expected}`")]
    WrongNode {
        /// This node.
        expected: String,
        /// The manifest's node.
        got: String,
    },
    /// Built for another system.
    #[error("manifest is for system `{got}`, this node is `{expected}`")]
    WrongSystem {
        /// This node's system.
        expected: String,
        /// The manifest's system.
        got: String,
    },
    /// Older than what this node already accepted.
    #[error(
        "manifest version {version} is below version {floor} already accepted (replay or rollback attack?)"
    )]
    BelowFloor {
        /// The manifest's version.
        version: Version,
        /// The stored floor.
        floor: Version,
    },
    /// Same version as the floor, different content: a publisher bug or an attack.
    #[error("manifest version {0} was already accepted with different content (security event)")]
    VersionReused(Version),
    /// Past its expiry.
    #[error("manifest expired at {expires_at} (trusted now is {now}); keeping the running system")]
    Expired {
        /// The manifest's expiry.
        expires_at: Timestamp,
        /// The trusted now.
        now: Timestamp,
    },
    /// Two profiles with the same name.
    #[error("profile `{0}` appears more than once")]
    DuplicateProfile(String),
    /// No profile at all.
    #[error("manifest lists no profiles")]
    NoProfiles,
    /// A `command` activation whose program leaves the store path.
    #[error(
        "profile `{profile}`: command activation `{argv0}` must be a relative path inside the profile"
    )]
    CommandOutsideProfile {
        /// The profile.
        profile: String,
        /// The offending program.
        argv0: String,
    },
}

impl Rejection {
    /// Whether the same bytes may be accepted later without a new publish: an expiry judged
    /// by a clock that was wrong (jumped ahead) passes once the clock is right again.
    pub fn may_pass_later(&self) -> bool {
        matches!(self, Rejection::Expired { .. })
    }

    /// Whether this refusal is a security event (forgery, replay, reuse) rather than a mistake.
    pub fn is_security_event(&self) -> bool {
        matches!(
            self,
            Rejection::Envelope(EnvelopeError::NotEnoughSignatures { .. })
                | Rejection::BelowFloor { .. }
                | Rejection::VersionReused(_)
        )
    }

    /// A short stable code for reports and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Envelope(EnvelopeError::TooLarge { .. }) => "too_large",
            Rejection::Envelope(EnvelopeError::Malformed(_)) => "malformed_envelope",
            Rejection::Envelope(EnvelopeError::PayloadBase64) => "bad_base64",
            Rejection::Envelope(EnvelopeError::NotEnoughSignatures { .. }) => "bad_signature",
            Rejection::Payload { .. } => "invalid_payload",
            Rejection::UnsupportedFormat(_) => "unsupported_format",
            Rejection::WrongNode { .. } => "wrong_node",
            Rejection::WrongSystem { .. } => "wrong_system",
            Rejection::BelowFloor { .. } => "below_floor",
            Rejection::VersionReused(_) => "version_reused",
            Rejection::Expired { .. } => "expired",
            Rejection::DuplicateProfile(_) => "duplicate_profile",
            Rejection::NoProfiles => "no_profiles",
            Rejection::CommandOutsideProfile { .. } => "command_outside_profile",
        }
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses a payload as a v1 manifest, naming the field at fault.
pub fn parse_manifest_payload(payload: &[u8]) -> Result<Manifest, Rejection> {
    #[derive(Deserialize)]
    struct Probe {
        format: u64,
    }
    let probe: Probe = serde_json::from_slice(payload).map_err(|e| Rejection::Payload {
        path: ".".into(),
        message: e.to_string(),
    })?;
    if probe.format != v1::FORMAT {
        return Err(Rejection::UnsupportedFormat(probe.format));
    }
    let de = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(de).map_err(|e| Rejection::Payload {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Verifies a manifest envelope against every rule of DESIGN §3.
///
/// `floor` is the highest version this node accepted (with the digest of its payload);
/// `trusted_now` is max(wall clock, newest `issued_at` seen).
pub fn verify_manifest(
    bytes: &[u8],
    trusted: &TrustedKeys,
    floor: Option<&Floor>,
    trusted_now: Timestamp,
    me: Identity<'_>,
) -> Result<Accepted, Rejection> {
    let opened = envelope::open(bytes, Context::Manifest, trusted)?;
    let manifest = parse_manifest_payload(&opened.payload)?;
    if &manifest.node != me.node {
        return Err(Rejection::WrongNode {
            expected: me.node.to_string(),
            got: manifest.node.to_string(),
        });
    }
    if manifest.system != me.system {
        return Err(Rejection::WrongSystem {
            expected: me.system.to_owned(),
            got: manifest.system.clone(),
        });
    }
    let d = digest(&opened.payload);
    if let Some(floor) = floor {
        if manifest.version < floor.version {
            return Err(Rejection::BelowFloor {
                version: manifest.version,
                floor: floor.version,
            });
        }
        if manifest.version == floor.version {
            return if d == floor.digest {
                Ok(Accepted::Unchanged(floor.version))
            } else {
                Err(Rejection::VersionReused(floor.version))
            };
        }
    }
    if manifest.expires_at <= trusted_now {
        return Err(Rejection::Expired {
            expires_at: manifest.expires_at,
            now: trusted_now,
        });
    }
    check_profiles(&manifest)?;
    Ok(Accepted::New(Box::new(Verified {
        manifest,
        payload: opened.payload,
        digest: d,
        signed_by: opened.signed_by,
    })))
}

/// Rules across profiles that the types alone cannot state.
fn check_profiles(m: &Manifest) -> Result<(), Rejection> {
    if m.profiles.is_empty() {
        return Err(Rejection::NoProfiles);
    }
    let mut seen = HashSet::new();
    for p in &m.profiles {
        if !seen.insert(p.name.as_str()) {
            return Err(Rejection::DuplicateProfile(p.name.to_string()));
        }
        if let v1::Activation::Command { argv } = &p.activation {
            let argv0 = argv.first().map(String::as_str).unwrap_or("");
            let escapes =
                argv0.is_empty() || argv0.starts_with('/') || argv0.split('/').any(|c| c == "..");
            if escapes {
                return Err(Rejection::CommandOutsideProfile {
                    profile: p.name.to_string(),
                    argv0: argv0.to_owned(),
                });
            }
        }
    }
    Ok(())
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("expected 64 hex digits");
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}
