//! Conversation history: a session is a list of messages in Redis under the tenant's own
//! keys ([`Keyspace::session`]), so another tenant naming the same session id reads and
//! extends a different, empty list.
//!
//! The API reads the history when a job names a `session_id` and puts it before the new
//! messages; the worker appends the turn (the new messages and the redacted reply) when the
//! job succeeds. The system prompt is stored apart, so trimming to the newest messages never
//! drops it. Every append renews the TTL.

use crate::redis_pool::Pool;
use sluice_proto::{Message, Role};

use crate::keyspace::Keyspace;
use crate::store::StoreError;

/// A session's stored state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub system: Option<String>,
    /// User and assistant messages, oldest first.
    pub messages: Vec<Message>,
}

impl History {
    pub fn is_empty(&self) -> bool {
        self.system.is_none() && self.messages.is_empty()
    }
}

/// Sessions in Redis.
#[derive(Clone)]
pub struct SessionStore {
    pool: Pool,
    ks: Keyspace,
}

impl SessionStore {
    pub fn new(pool: Pool, ks: Keyspace) -> Self {
        Self { pool, ks }
    }

    async fn conn(&self) -> Result<crate::redis_pool::Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// The tenant's session (empty if there is none).
    pub async fn load(&self, tenant: &str, session: &str) -> Result<History, StoreError> {
        let mut conn = self.conn().await?;
        let (system, raw): (Option<String>, Vec<String>) = redis::pipe()
            .get(self.ks.session_system(tenant, session))
            .lrange(self.ks.session(tenant, session), 0, -1)
            .query_async(&mut conn)
            .await?;
        // A message that does not parse is skipped rather than failing every later turn.
        let messages = raw
            .iter()
            .filter_map(|m| serde_json::from_str::<Message>(m).ok())
            .filter(|m| m.role != Role::System)
            .collect();
        Ok(History { system, messages })
    }

    /// Appends a turn, replaces the system prompt when `system` is given, keeps the newest
    /// `max_messages` and renews the TTL, in one transaction.
    pub async fn append(
        &self,
        tenant: &str,
        session: &str,
        system: Option<&str>,
        turn: &[Message],
        ttl_secs: u64,
        max_messages: u32,
    ) -> Result<(), StoreError> {
        let list = self.ks.session(tenant, session);
        let system_key = self.ks.session_system(tenant, session);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some(system) = system {
            pipe.set(&system_key, system).ignore();
        }
        for m in turn.iter().filter(|m| m.role != Role::System) {
            // Plain data with string keys: serialising cannot fail.
            pipe.rpush(&list, serde_json::to_string(m).unwrap_or_default())
                .ignore();
        }
        let keep = i64::from(max_messages.max(1));
        let ttl = ttl_secs.max(1) as i64;
        pipe.ltrim(&list, -keep as isize, -1)
            .ignore()
            .expire(&list, ttl)
            .ignore()
            .expire(&system_key, ttl)
            .ignore();
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Erases a session; whether there was one.
    pub async fn delete(&self, tenant: &str, session: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let removed: u32 = redis::cmd("DEL")
            .arg(self.ks.session(tenant, session))
            .arg(self.ks.session_system(tenant, session))
            .query_async(&mut conn)
            .await?;
        Ok(removed > 0)
    }
}
