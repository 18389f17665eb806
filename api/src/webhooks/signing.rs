//! Signatures per the Standard Webhooks specification (<https://www.standardwebhooks.com>):
//! an endpoint's secret is `whsec_` and the base64 of 32 random bytes; each attempt carries
//! `webhook-id` (the event id, the same on every retry), `webhook-timestamp` (unix seconds of
//! this attempt) and `webhook-signature: v1,<base64 of HMAC-SHA256(secret bytes,
//! "{id}.{timestamp}.{body}")>`, which a receiver's Standard Webhooks library verifies.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sluice_shared::Secret;

/// The prefix of a signing secret.
const PREFIX: &str = "whsec_";

/// A fresh signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn generate_secret() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(format!("{PREFIX}{}", STANDARD.encode(bytes)))
}

/// The key bytes of a `whsec_` secret (the prefix is optional, as in the reference libraries).
pub fn key_of(secret: &Secret) -> Result<Vec<u8>, base64::DecodeError> {
    let text = secret.expose();
    STANDARD.decode(text.strip_prefix(PREFIX).unwrap_or(text))
}

/// The `webhook-signature` header value for one attempt: `v1,<base64 signature>`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length");
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks reference libraries check themselves against
    /// (confirmed with Python's `hmac` when this test was written).
    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let key = key_of(&secret).expect("base64");
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// Another message, its expected value computed apart from this code:
    /// `python3 -c 'import hmac,hashlib,base64; print(base64.b64encode(hmac.new(bytes(range(32)),
    /// b"evt_0123.1700000000.{\"id\":\"evt_0123\",\"object\":\"event\"}", hashlib.sha256)
    /// .digest()).decode())'`.
    #[test]
    fn signs_over_id_timestamp_and_body() {
        let key: Vec<u8> = (0u8..32).collect();
        let signature = sign(
            &key,
            "evt_0123",
            1_700_000_000,
            br#"{"id":"evt_0123","object":"event"}"#,
        );
        assert_eq!(signature, "v1,QyxndRSfZO9yibzycJY7EQNbMTBO02lXn7+M49vsRhk=");
    }

    #[test]
    fn secrets_are_whsec_and_32_bytes() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("whsec_"));
        assert_eq!(key_of(&a).expect("base64").len(), 32);
        assert_eq!(format!("{a:?}"), "Secret(***)");
        let bare = Secret::new(a.expose().trim_start_matches("whsec_"));
        assert_eq!(key_of(&bare).expect("base64"), key_of(&a).expect("base64"));
        assert!(key_of(&Secret::new("whsec_not base64!")).is_err());
    }
}
