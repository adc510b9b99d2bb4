//! Validated names: store paths, node and profile names, profile paths, versions.
//!
//! Each type checks its rules once, in `FromStr` and `Deserialize`; a value that exists is valid.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The directory every store path lives in.
pub const STORE_DIR: &str = "/nix/store";

/// The 32 characters of Nix's base-32 alphabet (no `e`, `o`, `u`, `t`).
pub const NIX_BASE32_CHARS: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not a valid name of some kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{value}`: {reason}")]
pub struct NameError {
    /// What was being parsed (`store path`, `node name`, ...).
    pub kind: &'static str,
    /// The offending input, truncated for display.
    pub value: String,
    /// The rule it breaks.
    pub reason: &'static str,
}

impl NameError {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        let mut value = value.to_owned();
        if value.len() > 200 {
            let mut cut = 200;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self {
            kind,
            value,
            reason,
        }
    }
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $validate:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $validate(s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $validate(&s)?;
                Ok(Self(s))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_newtype!(
    /// `/nix/store/` + 32 nix-base32 characters + `-` + name, and nothing after.
    StorePath,
    validate_store_path
);
string_newtype!(
    /// A node's name: what the manifest's `node` field and the URL path carry.
    NodeName,
    validate_node_name
);
string_newtype!(
    /// A profile's name: `[A-Za-z0-9._+-]{1,64}`, not `.` or `..`.
    ProfileName,
    validate_profile_name
);
string_newtype!(
    /// An absolute filesystem path without `..` components, for `profile_path`.
    ProfilePath,
    validate_profile_path
);

impl StorePath {
    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.0[STORE_DIR.len() + 1..STORE_DIR.len() + 33]
    }

    /// The name after the hash and dash.
    pub fn name(&self) -> &str {
        &self.0[STORE_DIR.len() + 34..]
    }

    /// The path as a filesystem path.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl ProfilePath {
    /// The path as a filesystem path.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

fn validate_store_path(s: &str) -> Result<(), NameError> {
    const KIND: &str = "store path";
    let Some(rest) = s.strip_prefix(STORE_DIR).and_then(|r| r.strip_prefix('/')) else {
        return Err(NameError::new(KIND, s, "does not start with /nix/store/"));
    };
    if rest.len() < 34 {
        return Err(NameError::new(KIND, s, "too short for a hash and a name"));
    }
    let (hash, tail) = rest.split_at(32);
    if !hash.chars().all(|c| NIX_BASE32_CHARS.contains(c)) {
        return Err(NameError::new(
            KIND,
            s,
            "hash part is not 32 nix-base32 characters",
        ));
    }
    let Some(name) = tail.strip_prefix('-') else {
        return Err(NameError::new(KIND, s, "no `-` after the hash part"));
    };
    if name.contains('/') {
        return Err(NameError::new(
            KIND,
            s,
            "has something after the store object's name",
        ));
    }
    if name.is_empty() || name.len() > 211 {
        return Err(NameError::new(KIND, s, "name must be 1 to 211 characters"));
    }
    if name.starts_with('.') {
        return Err(NameError::new(KIND, s, "name may not start with `.`"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c))
    {
        return Err(NameError::new(
            KIND,
            s,
            "name has a character outside [A-Za-z0-9+-._?=]",
        ));
    }
    Ok(())
}

fn validate_node_name(s: &str) -> Result<(), NameError> {
    const KIND: &str = "node name";
    if s.is_empty() || s.len() > 253 {
        return Err(NameError::new(KIND, s, "must be 1 to 253 characters"));
    }
    if s == "." || s == ".." {
        return Err(NameError::new(KIND, s, "may not be `.` or `..`"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
    {
        return Err(NameError::new(KIND, s, "may only contain [A-Za-z0-9._+-]"));
    }
    Ok(())
}

fn validate_profile_name(s: &str) -> Result<(), NameError> {
    const KIND: &str = "profile name";
    if s.is_empty() || s.len() > 64 {
        return Err(NameError::new(KIND, s, "must be 1 to 64 characters"));
    }
    if s == "." || s == ".." {
        return Err(NameError::new(KIND, s, "may not be `.` or `..`"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
    {
        return Err(NameError::new(KIND, s, "may only contain [A-Za-z0-9._+-]"));
    }
    Ok(())
}

fn validate_profile_path(s: &str) -> Result<(), NameError> {
    const KIND: &str = "profile path";
    if !s.starts_with('/') {
        return Err(NameError::new(KIND, s, "must be absolute"));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(NameError::new(KIND, s, "may not contain `..`"));
    }
    if s.contains('\0') {
        return Err(NameError::new(KIND, s, "may not contain NUL"));
    }
    if s.len() > 4096 {
        return Err(NameError::new(KIND, s, "longer than 4096 bytes"));
    }
    Ok(())
}

/// A manifest version: strictly increasing per node (publish uses milliseconds since the epoch).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Version(pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Version {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12";

    #[test]
    fn store_path_accepts_a_plain_path_and_splits_it() {
        let p: StorePath = GOOD.parse().unwrap();
        assert_eq!(p.hash_part(), "0123456789abcdfghijklmnpqrsvwxyz");
        assert_eq!(p.name(), "hello-2.12");
    }

    #[test]
    fn store_path_refuses_anything_after_the_name() {
        for bad in [
            format!("{GOOD}/.."),
            format!("{GOOD}/bin/sh"),
            format!("{GOOD}/"),
        ] {
            let err = bad.parse::<StorePath>().unwrap_err();
            assert_eq!(
                err.reason, "has something after the store object's name",
                "{bad}"
            );
        }
    }

    #[test]
    fn store_path_refuses_other_prefixes_and_bad_hashes() {
        assert!(
            "/tmp/0123456789abcdfghijklmnpqrsvwxyz-x"
                .parse::<StorePath>()
                .is_err()
        );
        assert!(
            "/nix/store/../etc/passwd-0123456789abcdfghijklmnpqr"
                .parse::<StorePath>()
                .is_err()
        );
        // `e` is not in the nix-base32 alphabet.
        assert!(
            "/nix/store/e123456789abcdfghijklmnpqrsvwxyz-x"
                .parse::<StorePath>()
                .is_err()
        );
        assert!(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.hidden"
                .parse::<StorePath>()
                .is_err()
        );
        assert!(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-"
                .parse::<StorePath>()
                .is_err()
        );
    }

    #[test]
    fn profile_name_rules() {
        for ok in ["system", "home-manager", "a.b+c_d", &"x".repeat(64)] {
            assert!(ok.parse::<ProfileName>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65), "ä"] {
            assert!(bad.parse::<ProfileName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn profile_path_must_be_absolute_without_dotdot() {
        assert!(
            "/nix/var/nix/profiles/system"
                .parse::<ProfilePath>()
                .is_ok()
        );
        assert!(
            "nix/var/nix/profiles/system"
                .parse::<ProfilePath>()
                .is_err()
        );
        assert!("/nix/var/../../etc/shadow".parse::<ProfilePath>().is_err());
        assert!("/home/a/..".parse::<ProfilePath>().is_err());
    }

    #[test]
    fn node_name_refuses_path_separators() {
        assert!("web.prod".parse::<NodeName>().is_ok());
        assert!("../etc".parse::<NodeName>().is_err());
        assert!("a/b".parse::<NodeName>().is_err());
    }
}
