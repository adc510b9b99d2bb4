//! ed25519 keys in Nix's binary-cache key format.
//!
//! Secret: `NAME:base64(32-byte seed ‖ 32-byte public key)`; public: `NAME:base64(32 bytes)`.
//! `nix-store --generate-binary-cache-key` makes files in this format and so does [`SecretKey::generate`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// What is wrong with a key string or key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not `NAME:BASE64`.
    #[error("not a key in Nix's format `NAME:BASE64` (no `:` found)")]
    NoName,
    /// The name part is empty or has characters Nix would not write.
    #[error("key name `{0}` is empty or contains whitespace or `:`")]
    BadName(String),
    /// The base64 part does not decode.
    #[error("the part after `{name}:` is not valid base64")]
    BadBase64 {
        /// The key's name.
        name: String,
    },
    /// Decoded to the wrong number of bytes for the kind of key.
    #[error("key `{name}` decodes to {got} bytes, a {kind} key has {want}")]
    BadLength {
        /// The key's name.
        name: String,
        /// `secret` or `public`.
        kind: &'static str,
        /// Bytes found.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The public half stored in a secret key does not match its seed.
    #[error("secret key `{0}`: its public half does not match its seed (corrupt key file)")]
    Inconsistent(String),
    /// The bytes are not a valid ed25519 public key.
    #[error("key `{0}` is not a valid ed25519 public key")]
    InvalidPoint(String),
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file held something that is not a key.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with its content.
        source: Box<KeyError>,
    },
    /// The OS random generator failed.
    #[error("could not get random bytes from the OS: {0}")]
    Random(String),
}

fn split_key(s: &str) -> Result<(&str, &str), KeyError> {
    let s = s.trim();
    let (name, b64) = s.split_once(':').ok_or(KeyError::NoName)?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
        return Err(KeyError::BadName(name.to_owned()));
    }
    Ok((name, b64))
}

fn decode(name: &str, b64: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    STANDARD
        .decode(b64)
        .map(Zeroizing::new)
        .map_err(|_| KeyError::BadBase64 {
            name: name.to_owned(),
        })
}

fn read_key_file<T: FromStr<Err = KeyError>>(path: &Path) -> Result<T, KeyError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?);
    text.parse().map_err(|e| KeyError::File {
        path: path.display().to_string(),
        source: Box::new(e),
    })
}

/// A public ed25519 key with its name.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// The key's name (what signatures refer to).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads a public key file (`NAME:BASE64`).
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        read_key_file(path)
    }

    /// Whether `sig` is this key's signature over `message`.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        self.key.verify(message, &sig).is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split_key(s)?;
        let bytes = decode(name, b64)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength {
                name: name.to_owned(),
                kind: "public",
                got: bytes.len(),
                want: 32,
            })?;
        let key =
            VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::InvalidPoint(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret ed25519 key with its name. Never printed; its seed is zeroized on drop.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from the OS random generator.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
            return Err(KeyError::BadName(name.to_owned()));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The 64-byte signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Reads a secret key file (`NAME:BASE64` of 64 bytes).
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        read_key_file(path)
    }

    /// The secret in Nix's file format. Handle with care: this is the secret.
    pub fn to_nix_format(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new([0u8; 64]);
        bytes[..32].copy_from_slice(self.key.as_bytes());
        bytes[32..].copy_from_slice(self.key.verifying_key().as_bytes());
        Zeroizing::new(format!("{}:{}", self.name, STANDARD.encode(bytes.as_ref())))
    }

    /// Writes the secret to a new file with mode 0600; refuses to replace an existing file.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        write_new(path, self.to_nix_format().as_bytes(), 0o600)
    }
}

/// Writes `content` to a file that must not exist yet, with `mode`, and syncs it.
pub fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(content).map_err(io)?;
    f.sync_all().map_err(io)
}

impl FromStr for SecretKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split_key(s)?;
        let bytes = decode(name, b64)?;
        if bytes.len() != 64 {
            return Err(KeyError::BadLength {
                name: name.to_owned(),
                kind: "secret",
                got: bytes.len(),
                want: 64,
            });
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[..32]);
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes() != &bytes[32..] {
            return Err(KeyError::Inconsistent(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// The keys a reader trusts, by name, and how many must sign.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
    threshold: usize,
}

impl TrustedKeys {
    /// Trust `keys` with the given threshold (at least 1).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>, threshold: usize) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.name.clone(), k)).collect(),
            threshold: threshold.max(1),
        }
    }

    /// The key trusted under `name`.
    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    /// How many distinct trusted keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The trusted keys.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_round_trips_through_nix_format() {
        let k = SecretKey::generate("test-1").unwrap();
        let again: SecretKey = k.to_nix_format().parse().unwrap();
        assert_eq!(again.public(), k.public());
        let pubk: PublicKey = k.public().to_string().parse().unwrap();
        assert_eq!(pubk, k.public());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = SecretKey::generate("test-1").unwrap();
        let printed = format!("{k:?}");
        let secret = k.to_nix_format();
        let b64 = secret.split_once(':').unwrap().1;
        assert!(!printed.contains(b64));
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn wrong_lengths_and_formats_are_named() {
        let k = SecretKey::generate("a").unwrap();
        assert!(matches!(
            k.public().to_string().parse::<SecretKey>(),
            Err(KeyError::BadLength {
                kind: "secret",
                got: 32,
                ..
            })
        ));
        assert!(matches!(
            k.to_nix_format().parse::<PublicKey>(),
            Err(KeyError::BadLength {
                kind: "public",
                got: 64,
                ..
            })
        ));
        assert!(matches!(
            "nocolon".parse::<PublicKey>(),
            Err(KeyError::NoName)
        ));
        assert!(matches!(
            "a:!!!".parse::<PublicKey>(),
            Err(KeyError::BadBase64 { .. })
        ));
    }

    #[test]
    fn corrupt_secret_is_refused() {
        let k = SecretKey::generate("a").unwrap();
        let mut bytes = STANDARD
            .decode(k.to_nix_format().split_once(':').unwrap().1)
            .unwrap();
        bytes[40] ^= 1;
        let s = format!("a:{}", STANDARD.encode(&bytes));
        assert!(matches!(
            s.parse::<SecretKey>(),
            Err(KeyError::Inconsistent(_))
        ));
    }

    #[test]
    fn write_new_file_refuses_to_overwrite_and_sets_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sec");
        let k = SecretKey::generate("a").unwrap();
        k.write_new_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = fs::read(&path).unwrap();
        let other = SecretKey::generate("b").unwrap();
        assert!(other.write_new_file(&path).is_err());
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(SecretKey::read_file(&path).unwrap().public(), k.public());
    }
}
