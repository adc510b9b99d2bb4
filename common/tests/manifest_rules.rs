//! One test per rejection rule of DESIGN §3, each asserting the specific rejection.

use roost_common::envelope::{Context, Envelope, EnvelopeError, Signature};
use roost_common::verify::{Accepted, Floor, Identity, Rejection, digest, verify_manifest};
use roost_common::{NodeName, SecretKey, Timestamp, TrustedKeys, Version};
use serde_json::{Value, json};

const PATH: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-pi-kitchen";
const NOW: u64 = 1_795_348_800; // 2026-11-22T12:00:00Z

fn payload() -> Value {
    json!({
        "format": 1,
        "node": "pi-kitchen",
        "system": "aarch64-linux",
        "version": 1_795_349_047_123u64,
        "issued_at": "2026-11-22T12:00:00Z",
        "expires_at": "2026-12-22T12:00:00Z",
        "profiles": [{
            "name": "system",
            "path": PATH,
            "activation": { "kind": "nixos", "goal": "switch" },
            "health_checks": [{ "kind": "command", "argv": ["true"], "timeout_s": 5 }]
        }]
    })
}

struct Fixture {
    key: SecretKey,
    trusted: TrustedKeys,
    node: NodeName,
}

impl Fixture {
    fn new() -> Self {
        let key = SecretKey::generate("publisher-1").unwrap();
        let trusted = TrustedKeys::new([key.public()], 1);
        Self {
            key,
            trusted,
            node: "pi-kitchen".parse().unwrap(),
        }
    }

    fn seal(&self, p: &Value) -> Vec<u8> {
        Envelope::seal(
            Context::Manifest,
            &serde_json::to_vec(p).unwrap(),
            &[&self.key],
        )
        .to_bytes()
    }

    fn verify(&self, bytes: &[u8], floor: Option<&Floor>) -> Result<Accepted, Rejection> {
        verify_manifest(
            bytes,
            &self.trusted,
            floor,
            Timestamp::from_unix(NOW),
            Identity {
                node: &self.node,
                system: "aarch64-linux",
            },
        )
    }

    fn reject(&self, p: &Value) -> Rejection {
        self.verify(&self.seal(p), None)
            .expect_err("must be rejected")
    }
}

fn with(mut p: Value, pointer: &str, v: Value) -> Value {
    *p.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}")) = v;
    p
}

#[test]
fn a_valid_manifest_is_accepted() {
    let f = Fixture::new();
    let Accepted::New(v) = f.verify(&f.seal(&payload()), None).unwrap() else {
        panic!("not new")
    };
    assert_eq!(v.manifest.version, Version(1_795_349_047_123));
    assert_eq!(v.signed_by, vec!["publisher-1".to_owned()]);
}

#[test]
fn bad_signature_is_rejected() {
    let f = Fixture::new();
    let mut env: Envelope = serde_json::from_slice(&f.seal(&payload())).unwrap();
    let mut sig = base64_decode(&env.signatures[0].sig);
    sig[0] ^= 0xff;
    env.signatures[0].sig = base64_encode(&sig);
    let err = f.verify(&env.to_bytes(), None).unwrap_err();
    assert_eq!(
        err,
        Rejection::Envelope(EnvelopeError::NotEnoughSignatures {
            valid: 0,
            threshold: 1,
            invalid: vec!["publisher-1".into()],
            unknown: vec![],
        })
    );
}

#[test]
fn unknown_key_is_rejected() {
    let f = Fixture::new();
    let stranger = SecretKey::generate("stranger").unwrap();
    let bytes = Envelope::seal(
        Context::Manifest,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&stranger],
    )
    .to_bytes();
    let err = f.verify(&bytes, None).unwrap_err();
    assert!(
        matches!(err, Rejection::Envelope(EnvelopeError::NotEnoughSignatures { valid: 0, ref unknown, .. }) if unknown == &["stranger"])
    );
}

#[test]
fn a_trusted_name_with_another_key_does_not_verify() {
    let f = Fixture::new();
    let impostor = SecretKey::generate("publisher-1").unwrap();
    let bytes = Envelope::seal(
        Context::Manifest,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&impostor],
    )
    .to_bytes();
    let err = f.verify(&bytes, None).unwrap_err();
    assert!(
        matches!(err, Rejection::Envelope(EnvelopeError::NotEnoughSignatures { valid: 0, ref invalid, .. }) if invalid == &["publisher-1"])
    );
}

#[test]
fn below_threshold_is_rejected() {
    let a = SecretKey::generate("a").unwrap();
    let b = SecretKey::generate("b").unwrap();
    let trusted = TrustedKeys::new([a.public(), b.public()], 2);
    let bytes = Envelope::seal(
        Context::Manifest,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&a],
    )
    .to_bytes();
    let node: NodeName = "pi-kitchen".parse().unwrap();
    let me = Identity {
        node: &node,
        system: "aarch64-linux",
    };
    let err = verify_manifest(&bytes, &trusted, None, Timestamp::from_unix(NOW), me).unwrap_err();
    assert!(matches!(
        err,
        Rejection::Envelope(EnvelopeError::NotEnoughSignatures {
            valid: 1,
            threshold: 2,
            ..
        })
    ));
    // Both keys meet the threshold.
    let bytes = Envelope::seal(
        Context::Manifest,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&a, &b],
    )
    .to_bytes();
    assert!(verify_manifest(&bytes, &trusted, None, Timestamp::from_unix(NOW), me).is_ok());
}

#[test]
fn wrong_context_string_is_rejected() {
    let f = Fixture::new();
    let bytes = Envelope::seal(
        Context::Report,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&f.key],
    )
    .to_bytes();
    let err = f.verify(&bytes, None).unwrap_err();
    assert!(
        matches!(err, Rejection::Envelope(EnvelopeError::NotEnoughSignatures { valid: 0, ref invalid, .. }) if invalid == &["publisher-1"])
    );
}

#[test]
fn oversized_envelope_is_rejected_before_parsing() {
    let f = Fixture::new();
    let mut bytes = f.seal(&payload());
    bytes.resize(256 * 1024 + 1, b' ');
    assert_eq!(
        f.verify(&bytes, None).unwrap_err(),
        Rejection::Envelope(EnvelopeError::TooLarge {
            size: 256 * 1024 + 1,
            max: 256 * 1024
        })
    );
}

#[test]
fn malformed_envelope_json_is_rejected() {
    let f = Fixture::new();
    assert!(matches!(
        f.verify(b"{\"payload\": 1", None).unwrap_err(),
        Rejection::Envelope(EnvelopeError::Malformed(_))
    ));
    assert!(matches!(
        f.verify(b"[]", None).unwrap_err(),
        Rejection::Envelope(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn malformed_base64_is_rejected() {
    let f = Fixture::new();
    let env = Envelope {
        payload: "not base64!!".into(),
        signatures: vec![],
    };
    assert_eq!(
        f.verify(&env.to_bytes(), None).unwrap_err(),
        Rejection::Envelope(EnvelopeError::PayloadBase64)
    );
}

#[test]
fn malformed_payload_json_is_rejected() {
    let f = Fixture::new();
    let bytes = Envelope::seal(Context::Manifest, b"{not json", &[&f.key]).to_bytes();
    assert!(
        matches!(f.verify(&bytes, None).unwrap_err(), Rejection::Payload { ref path, .. } if path == ".")
    );
}

#[test]
fn wrong_format_is_rejected() {
    let f = Fixture::new();
    assert_eq!(
        f.reject(&with(payload(), "/format", json!(2))),
        Rejection::UnsupportedFormat(2)
    );
}

#[test]
fn wrong_node_is_rejected() {
    let f = Fixture::new();
    assert_eq!(
        f.reject(&with(payload(), "/node", json!("pi-garage"))),
        Rejection::WrongNode {
            expected: "pi-kitchen".into(),
            got: "pi-garage".into()
        }
    );
}

#[test]
fn wrong_system_is_rejected() {
    let f = Fixture::new();
    assert_eq!(
        f.reject(&with(payload(), "/system", json!("x86_64-linux"))),
        Rejection::WrongSystem {
            expected: "aarch64-linux".into(),
            got: "x86_64-linux".into()
        }
    );
}

#[test]
fn version_below_floor_is_rejected() {
    let f = Fixture::new();
    let floor = Floor {
        version: Version(1_795_349_047_124),
        digest: [0; 32],
    };
    let err = f.verify(&f.seal(&payload()), Some(&floor)).unwrap_err();
    assert_eq!(
        err,
        Rejection::BelowFloor {
            version: Version(1_795_349_047_123),
            floor: floor.version
        }
    );
    assert!(err.is_security_event());
}

#[test]
fn equal_version_with_identical_bytes_is_a_no_op() {
    let f = Fixture::new();
    let bytes = f.seal(&payload());
    let Accepted::New(v) = f.verify(&bytes, None).unwrap() else {
        panic!()
    };
    assert_eq!(
        f.verify(&bytes, Some(&v.floor())).unwrap(),
        Accepted::Unchanged(v.manifest.version)
    );
}

#[test]
fn equal_version_with_different_bytes_is_a_security_event() {
    let f = Fixture::new();
    let Accepted::New(v) = f.verify(&f.seal(&payload()), None).unwrap() else {
        panic!()
    };
    let other = with(
        payload(),
        "/profiles/0/path",
        json!("/nix/store/1123456789abcdfghijklmnpqrsvwxyz-evil"),
    );
    let err = f.verify(&f.seal(&other), Some(&v.floor())).unwrap_err();
    assert_eq!(err, Rejection::VersionReused(v.manifest.version));
    assert!(err.is_security_event());
}

#[test]
fn expired_against_trusted_now_is_rejected() {
    let f = Fixture::new();
    let bytes = f.seal(&payload());
    let node = f.node.clone();
    let me = Identity {
        node: &node,
        system: "aarch64-linux",
    };
    // The wall clock may be wrong; a later `issued_at` seen before still makes it expired.
    let trusted_now: Timestamp = "2026-12-22T12:00:01Z".parse().unwrap();
    let err = verify_manifest(&bytes, &f.trusted, None, trusted_now, me).unwrap_err();
    assert_eq!(
        err,
        Rejection::Expired {
            expires_at: "2026-12-22T12:00:00Z".parse().unwrap(),
            now: trusted_now
        }
    );
}

#[test]
fn non_store_path_is_rejected() {
    let f = Fixture::new();
    let err = f.reject(&with(payload(), "/profiles/0/path", json!("/tmp/evil")));
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path == "profiles[0].path" && message.contains("does not start with /nix/store/")),
        "{err}"
    );
}

#[test]
fn non_store_drv_path_is_rejected() {
    let f = Fixture::new();
    let mut p = payload();
    p["profiles"][0]["drv_path"] = json!("/etc/x.drv");
    let err = f.reject(&p);
    assert!(
        matches!(err, Rejection::Payload { ref path, .. } if path == "profiles[0].drv_path"),
        "{err}"
    );
}

#[test]
fn store_path_with_trailing_dotdot_is_rejected() {
    let f = Fixture::new();
    let err = f.reject(&with(
        payload(),
        "/profiles/0/path",
        json!(format!("{PATH}/..")),
    ));
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path == "profiles[0].path" && message.contains("after the store object's name")),
        "{err}"
    );
}

#[test]
fn bad_profile_name_is_rejected() {
    let f = Fixture::new();
    for bad in ["..", "a/b", "", "x y"] {
        let err = f.reject(&with(payload(), "/profiles/0/name", json!(bad)));
        assert!(
            matches!(err, Rejection::Payload { ref path, ref message } if path == "profiles[0].name" && message.contains("profile name")),
            "{bad}: {err}"
        );
    }
}

#[test]
fn duplicate_profile_is_rejected() {
    let f = Fixture::new();
    let mut p = payload();
    let first = p["profiles"][0].clone();
    p["profiles"].as_array_mut().unwrap().push(first);
    assert_eq!(f.reject(&p), Rejection::DuplicateProfile("system".into()));
}

#[test]
fn relative_profile_path_is_rejected() {
    let f = Fixture::new();
    let mut p = payload();
    p["profiles"][0]["profile_path"] = json!("nix/var/nix/profiles/system");
    let err = f.reject(&p);
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path == "profiles[0].profile_path" && message.contains("must be absolute")),
        "{err}"
    );
}

#[test]
fn dotdot_profile_path_is_rejected() {
    let f = Fixture::new();
    let mut p = payload();
    p["profiles"][0]["profile_path"] = json!("/nix/var/nix/profiles/../../../etc/shadow");
    let err = f.reject(&p);
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path == "profiles[0].profile_path" && message.contains("`..`")),
        "{err}"
    );
}

#[test]
fn unknown_activation_kind_is_rejected() {
    let f = Fixture::new();
    let err = f.reject(&with(
        payload(),
        "/profiles/0/activation",
        json!({"kind": "magic"}),
    ));
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path.starts_with("profiles[0].activation") && message.contains("unknown variant `magic`")),
        "{err}"
    );
}

#[test]
fn unknown_health_check_kind_is_rejected() {
    let f = Fixture::new();
    let err = f.reject(&with(
        payload(),
        "/profiles/0/health_checks/0",
        json!({"kind": "ping", "host": "x"}),
    ));
    assert!(
        matches!(err, Rejection::Payload { ref path, ref message } if path.starts_with("profiles[0].health_checks[0]") && message.contains("unknown variant `ping`")),
        "{err}"
    );
}

#[test]
fn command_activation_escaping_the_profile_is_rejected() {
    let f = Fixture::new();
    for argv0 in ["/bin/sh", "../../bin/sh", "bin/../../x"] {
        let err = f.reject(&with(
            payload(),
            "/profiles/0/activation",
            json!({"kind": "command", "argv": [argv0]}),
        ));
        assert_eq!(
            err,
            Rejection::CommandOutsideProfile {
                profile: "system".into(),
                argv0: argv0.into()
            }
        );
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let f = Fixture::new();
    let mut p = payload();
    p["from_the_future"] = json!({"a": 1});
    p["profiles"][0]["also_new"] = json!(true);
    assert!(matches!(
        f.verify(&f.seal(&p), None).unwrap(),
        Accepted::New(_)
    ));
}

#[test]
fn each_key_counts_once_toward_the_threshold() {
    let a = SecretKey::generate("a").unwrap();
    let b = SecretKey::generate("b").unwrap();
    let trusted = TrustedKeys::new([a.public(), b.public()], 2);
    let mut env = Envelope::seal(
        Context::Manifest,
        &serde_json::to_vec(&payload()).unwrap(),
        &[&a],
    );
    env.signatures.push(env.signatures[0].clone());
    env.signatures.push(Signature {
        key: "b".into(),
        sig: env.signatures[0].sig.clone(),
    });
    let node: NodeName = "pi-kitchen".parse().unwrap();
    let err = verify_manifest(
        &env.to_bytes(),
        &trusted,
        None,
        Timestamp::from_unix(NOW),
        Identity {
            node: &node,
            system: "aarch64-linux",
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Rejection::Envelope(EnvelopeError::NotEnoughSignatures {
            valid: 1,
            threshold: 2,
            ..
        })
    ));
}

#[test]
fn the_floor_digest_is_the_payload_digest() {
    let f = Fixture::new();
    let p = serde_json::to_vec(&payload()).unwrap();
    let bytes = Envelope::seal(Context::Manifest, &p, &[&f.key]).to_bytes();
    let Accepted::New(v) = f.verify(&bytes, None).unwrap() else {
        panic!()
    };
    assert_eq!(v.digest, digest(&p));
    assert_eq!(v.payload, p);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
