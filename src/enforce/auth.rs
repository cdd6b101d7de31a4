//! Authentication of relay-affecting commands beyond the broker's credentials: each carries an
//! Ed25519 signature over its content, an id and an expiry.
//!
//! Signed content: `"{command}\n{json}"` where `json` is the command object (with `id` and
//! `expires_at`, without `sig`) serialized with its keys sorted, no whitespace (`serde_json`'s default
//! map is ordered). `sig` is the base64 (standard, padded) of the 64-byte signature.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;

/// The bytes a command's signature covers.
#[must_use]
pub fn signed_content(command: &str, id: &str, args: &Value) -> Vec<u8> {
    let mut obj = match args {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    obj.remove("sig");
    obj.insert("id".into(), Value::String(id.to_string()));
    format!("{command}\n{}", Value::Object(obj)).into_bytes()
}

/// Parses a public key given as base64 or hex (32 bytes).
pub(crate) fn parse_key(s: &str) -> Result<VerifyingKey, String> {
    let s = s.trim();
    let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
            .collect::<Result<Vec<u8>, _>>()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("not base64 or hex: {e}"))?
    };
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&arr).map_err(|e| format!("invalid Ed25519 key: {e}"))
}

/// Checks signature and expiry; `seen` says whether an id was already used.
pub(crate) fn verify(
    key: &VerifyingKey,
    command: &str,
    id: &str,
    args: &Value,
    now: DateTime<Utc>,
    seen: impl Fn(&str) -> bool,
) -> Result<DateTime<Utc>, String> {
    let Some(sig) = args.get("sig").and_then(Value::as_str) else {
        return Err("unsigned: relay commands need \"sig\" (Ed25519 over the command, see docs/enforcement.md)".into());
    };
    let Some(expires) = args.get("expires_at").and_then(Value::as_str) else {
        return Err("missing \"expires_at\" (RFC 3339)".into());
    };
    let expires: DateTime<Utc> = DateTime::parse_from_rfc3339(expires)
        .map_err(|e| format!("\"expires_at\": {e}"))?
        .with_timezone(&Utc);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|e| format!("\"sig\" is not base64: {e}"))?;
    let arr: [u8; 64] = raw
        .try_into()
        .map_err(|_| "\"sig\" must be 64 bytes".to_string())?;
    key.verify_strict(
        &signed_content(command, id, args),
        &Signature::from_bytes(&arr),
    )
    .map_err(|_| "bad signature: refused".to_string())?;
    if expires <= now {
        return Err(format!("expired at {}", expires.to_rfc3339()));
    }
    if seen(id) {
        return Err(format!("replay: command id {id:?} was already used"));
    }
    Ok(expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::json;
    use std::fmt::Write as _;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn sign(cmd: &str, id: &str, mut args: Value) -> Value {
        let sig = key().sign(&signed_content(cmd, id, &args));
        args["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
        args
    }

    #[test]
    fn forged_replayed_expired_and_unsigned_commands_are_refused() {
        let pk = key().verifying_key();
        let now = crate::clock::Clock::system().now();
        let exp = (now + chrono::Duration::minutes(5)).to_rfc3339();
        let args =
            json!({"room": "101", "scope": "access", "reason": "arrears", "expires_at": exp});
        let good = sign("freeze", "c-1", args.clone());
        assert!(verify(&pk, "freeze", "c-1", &good, now, |_| false).is_ok());
        // Same signature, other room: forged.
        let mut forged = good.clone();
        forged["room"] = json!("102");
        assert!(verify(&pk, "freeze", "c-1", &forged, now, |_| false)
            .unwrap_err()
            .contains("bad signature"));
        // Signature for another command name or id.
        assert!(verify(&pk, "unfreeze", "c-1", &good, now, |_| false)
            .unwrap_err()
            .contains("bad signature"));
        assert!(verify(&pk, "freeze", "c-2", &good, now, |_| false)
            .unwrap_err()
            .contains("bad signature"));
        // Replayed.
        assert!(verify(&pk, "freeze", "c-1", &good, now, |id| id == "c-1")
            .unwrap_err()
            .contains("replay"));
        // Expired.
        let old = sign(
            "freeze",
            "c-3",
            json!({"room": "101", "expires_at": (now - chrono::Duration::seconds(1)).to_rfc3339()}),
        );
        assert!(verify(&pk, "freeze", "c-3", &old, now, |_| false)
            .unwrap_err()
            .contains("expired"));
        // Unsigned.
        assert!(verify(&pk, "freeze", "c-4", &args, now, |_| false)
            .unwrap_err()
            .contains("unsigned"));
        // Signed by someone else.
        let other =
            SigningKey::from_bytes(&[9u8; 32]).sign(&signed_content("freeze", "c-5", &args));
        let mut theirs = args.clone();
        theirs["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(other.to_bytes()));
        assert!(verify(&pk, "freeze", "c-5", &theirs, now, |_| false)
            .unwrap_err()
            .contains("bad signature"));
    }

    #[test]
    fn keys_parse_from_hex_and_base64() {
        let pk = key().verifying_key();
        let hex: String = pk.to_bytes().iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        assert_eq!(parse_key(&hex).unwrap(), pk);
        assert_eq!(
            parse_key(&base64::engine::general_purpose::STANDARD.encode(pk.to_bytes())).unwrap(),
            pk
        );
        assert!(parse_key("abcd").is_err());
    }
}
