//! JWT bearer tokens: HS256 with a shared secret, RS256/ES256 with a PEM public key or a JWKS
//! file. `exp`, `nbf`, `iss` and `aud` are always checked; tenant and role come from claims.

use std::collections::HashMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::principal::{Principal, Role};
use crate::settings::JwtSettings;

#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("JWT needs both --jwt-issuer and --jwt-audience")]
    MissingIssuerOrAudience,
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("JWT key: {0}")]
    Key(String),
}

/// Verifies tokens against the configured keys.
pub struct JwtVerifier {
    /// Keys without a `kid` (shared secret, PEM key), tried by algorithm.
    keys: Vec<(Algorithm, DecodingKey)>,
    /// JWKS keys by `kid`.
    jwks: HashMap<String, (Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    tenant_claim: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, JwtConfigError> {
    std::fs::read(path).map_err(|source| JwtConfigError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl JwtVerifier {
    /// `None` when no key source is configured (JWTs are then refused like any unknown token).
    pub fn from_settings(s: &JwtSettings) -> Result<Option<Self>, JwtConfigError> {
        if s.jwt_hs256_secret.is_none()
            && s.jwt_public_key_file.is_none()
            && s.jwt_jwks_file.is_none()
        {
            return Ok(None);
        }
        let (Some(issuer), Some(audience)) = (&s.jwt_issuer, &s.jwt_audience) else {
            return Err(JwtConfigError::MissingIssuerOrAudience);
        };
        let key_err = |e: jsonwebtoken::errors::Error| JwtConfigError::Key(e.to_string());
        let mut keys = Vec::new();
        if let Some(secret) = &s.jwt_hs256_secret {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose().as_bytes()),
            ));
        }
        if let Some(path) = &s.jwt_public_key_file {
            let pem = read(path)?;
            match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => keys.push((Algorithm::RS256, k)),
                Err(_) => keys.push((
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(&pem).map_err(key_err)?,
                )),
            }
        }
        let mut jwks = HashMap::new();
        if let Some(path) = &s.jwt_jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(path)?)
                .map_err(|e| JwtConfigError::Key(format!("JWKS: {e}")))?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    continue;
                };
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => continue,
                };
                jwks.insert(kid, (alg, DecodingKey::from_jwk(jwk).map_err(key_err)?));
            }
        }
        Ok(Some(Self {
            keys,
            jwks,
            issuer: issuer.clone(),
            audience: audience.clone(),
            tenant_claim: s.jwt_tenant_claim.clone(),
        }))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.validate_nbf = true;
        v.leeway = 30;
        v.required_spec_claims = ["exp", "iss", "aud", "sub"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v
    }

    /// Verifies a token; the error string is for logs only.
    pub fn verify(&self, token: &str) -> Result<Principal, &'static str> {
        let header = decode_header(token).map_err(|_| "malformed jwt")?;
        let candidates: Vec<&(Algorithm, DecodingKey)> = match &header.kid {
            Some(kid) if !self.jwks.is_empty() => self.jwks.get(kid).into_iter().collect(),
            _ => self.keys.iter().collect(),
        };
        // The header's algorithm must be the key's: no `alg` confusion (an HS256 token signed
        // with an RSA public key as secret is refused).
        let (alg, key) = candidates
            .into_iter()
            .find(|(alg, _)| *alg == header.alg)
            .ok_or("no key for the jwt's algorithm")?;
        let data = decode::<Claims>(token, key, &self.validation(*alg))
            .map_err(|_| "jwt rejected (signature or claims)")?;
        let claims = data.claims;
        let tenant = claims
            .rest
            .get(&self.tenant_claim)
            .and_then(|v| v.as_str())
            .filter(|t| sluice_shared::settings::parse_namespace(t).is_ok())
            .ok_or("jwt has no valid tenant claim")?
            .to_string();
        let role = match claims.role.as_deref() {
            None | Some("user") => Role::User,
            Some("admin") => Role::Admin,
            Some(_) => return Err("jwt has an unknown role"),
        };
        Ok(Principal {
            tenant,
            key_id: format!("jwt:{}", claims.sub),
            role,
            policy: None,
        })
    }
}
