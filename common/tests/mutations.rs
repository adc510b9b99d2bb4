//! Random mutations of a valid envelope never get a different payload accepted.
//!
//! Bytes outside the signed payload (JSON whitespace between fields) may change without
//! effect, so the property is: a mutated envelope is refused, or it yields exactly the
//! payload that was signed. Mutations inside the payload are always refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use roost_common::envelope::{Context, Envelope};
use roost_common::verify::{Accepted, Identity, verify_manifest};
use roost_common::{NodeName, SecretKey, Timestamp, TrustedKeys};
use serde_json::{Map, Value, json};

fn payload() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "format": 1, "node": "n1", "system": "x86_64-linux", "version": 42,
        "issued_at": "2026-11-22T12:00:00Z", "expires_at": "2026-12-22T12:00:00Z",
        "profiles": [{ "name": "system",
            "path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-n1",
            "activation": { "kind": "nixos" } }]
    }))
    .unwrap()
}

struct Setup {
    key: SecretKey,
    trusted: TrustedKeys,
    node: NodeName,
}

fn setup() -> Setup {
    let key = SecretKey::generate("pub").unwrap();
    Setup {
        trusted: TrustedKeys::new([key.public()], 1),
        key,
        node: "n1".parse().unwrap(),
    }
}

fn accepted_payload(s: &Setup, bytes: &[u8]) -> Option<Vec<u8>> {
    let me = Identity {
        node: &s.node,
        system: "x86_64-linux",
    };
    match verify_manifest(
        bytes,
        &s.trusted,
        None,
        Timestamp::from_unix(1_795_348_800),
        me,
    ) {
        Ok(Accepted::New(v)) => Some(v.payload),
        Ok(Accepted::Unchanged(_)) => unreachable!("no floor given"),
        Err(_) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn flipped_envelope_bytes_never_change_the_accepted_payload(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let s = setup();
        let original = payload();
        let mut bytes = Envelope::seal(Context::Manifest, &original, &[&s.key]).to_bytes();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if let Some(p) = accepted_payload(&s, &bytes) {
            prop_assert_eq!(p, original);
        }
    }

    #[test]
    fn flipped_payload_bytes_never_verify(at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let s = setup();
        let mut env = Envelope::seal(Context::Manifest, &payload(), &[&s.key]);
        let mut p = payload();
        let i = at.index(p.len());
        p[i] ^= mask;
        env.payload = STANDARD.encode(&p);
        prop_assert!(accepted_payload(&s, &env.to_bytes()).is_none());
    }

    #[test]
    fn truncated_envelopes_never_verify(cut in any::<prop::sample::Index>()) {
        let s = setup();
        let bytes = Envelope::seal(Context::Manifest, &payload(), &[&s.key]).to_bytes();
        // Only the trailing newline can go without touching the JSON.
        let len = cut.index(bytes.len() - 1);
        prop_assert!(accepted_payload(&s, &bytes[..len]).is_none());
    }

    #[test]
    fn reordered_payload_fields_never_verify(seed in any::<u64>()) {
        let s = setup();
        let mut env = Envelope::seal(Context::Manifest, &payload(), &[&s.key]);
        let Value::Object(fields) = serde_json::from_slice::<Value>(&payload()).unwrap() else { unreachable!() };
        let mut entries: Vec<(String, Value)> = fields.into_iter().collect();
        // A deterministic shuffle from the seed; the identity order is skipped.
        let n = entries.len();
        let mut state = seed | 1;
        for i in (1..n).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            entries.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut reordered = Vec::from(&b"{"[..]);
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 { reordered.push(b','); }
            reordered.extend(serde_json::to_vec(k).unwrap());
            reordered.push(b':');
            reordered.extend(serde_json::to_vec(v).unwrap());
        }
        reordered.push(b'}');
        prop_assume!(reordered != payload());
        // Same JSON value, different bytes: the signature covers bytes, so it must fail.
        let _: Map<String, Value> = serde_json::from_slice(&reordered).unwrap();
        env.payload = STANDARD.encode(&reordered);
        prop_assert!(accepted_payload(&s, &env.to_bytes()).is_none());
    }
}
