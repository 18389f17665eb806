//! Who a request acts for: the [`Principal`] (tenant, key or JWT subject, role) that the
//! `auth` extractors produce, and the [`Role`] a key or token carries.

/// What a key may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[schema(as = KeyRole)]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller of a request, within its rate limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub tenant: String,
    /// The API key id, or `jwt:<sub>` for a JWT: the subject rate limits apply to.
    pub key_id: String,
    pub role: Role,
    /// The tenant's policy as read for this request's rate limits, so the handler does not
    /// read it again (`None` until the extractor has read it).
    pub policy: Option<crate::tenant::TenantPolicy>,
}

/// A principal with the `admin` role (403 otherwise).
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);
