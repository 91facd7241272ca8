//! Grants and the delegation signing keys, with the delegation revision that sidecars resume
//! from. Revoking, closing and key creation bump the revision in their transaction and announce
//! [`Change::Delegation`]; creating a grant does not (sidecars need only what is no longer valid).

use std::fmt;

use mandate_wire::{DelegationState, Jwk, RevokedGrant};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sqlx::error::ErrorKind;

use super::backend::{BeginWrite as _, Notify as _, on_pool};
use super::select::{Arg, Select, bind_all};
use super::{Change, Store, StoreError};

/// The columns [`GrantRow`] decodes, in its order.
macro_rules! grant_columns {
    () => {
        "id, agent, agent_id, subject, scopes, constraints, purpose, task, approved_by, \
         approved_at, created_at, expires_at, status, revoked_at, revoked_by"
    };
}

type GrantRow = (
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    String,
    Option<i64>,
    Option<String>,
);

const BUMP_DELEGATION: &str =
    "UPDATE state SET delegation_revision = delegation_revision + 1 WHERE id = 1";

/// Where a grant stands. The store keeps active, revoked and closed; an active grant whose time
/// ran out is shown as expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    /// In force: tokens may be issued from it.
    Active,
    /// Revoked by an operator; final.
    Revoked,
    /// Closed with its task; final.
    Closed,
    /// Its time ran out while active.
    Expired,
}

impl GrantStatus {
    /// The lowercase word used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Closed => "closed",
            Self::Expired => "expired",
        }
    }

    /// Parses the lowercase word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "revoked" => Some(Self::Revoked),
            "closed" => Some(Self::Closed),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

impl fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated grant to store (it starts active).
#[derive(Debug, Clone)]
pub struct NewGrant {
    /// Its id (UUIDv7).
    pub id: String,
    /// The agent's name.
    pub agent: String,
    /// The agent's SPIFFE ID (must be registered).
    pub agent_id: String,
    /// The person who consents.
    pub subject: String,
    /// Scope objects, each within the agent's ceiling.
    pub scopes: Vec<Value>,
    /// Constraints the policy applies on top of the scopes.
    pub constraints: Option<Map<String, Value>>,
    /// Why.
    pub purpose: String,
    /// The task it belongs to, if any (closing the task ends it).
    pub task: Option<String>,
    /// Who approved it.
    pub approved_by: String,
    /// When it was approved, unix milliseconds.
    pub approved_at: i64,
    /// When it was recorded, unix milliseconds.
    pub created_at: i64,
    /// When it ends, unix milliseconds.
    pub expires_at: i64,
}

/// A stored grant, as the API shows it (times as RFC 3339).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    /// Its id (UUIDv7).
    pub id: String,
    /// The agent's name.
    pub agent: String,
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The person who consents.
    pub subject: String,
    /// Scope objects.
    pub scopes: Vec<Value>,
    /// Constraints, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Map<String, Value>>,
    /// Why.
    pub purpose: String,
    /// The task it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Who approved it.
    pub approved_by: String,
    /// When it was approved.
    #[serde(serialize_with = "rfc3339")]
    pub approved_at: i64,
    /// When it was recorded.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: i64,
    /// When it ends.
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: i64,
    /// Active, revoked, closed or expired.
    pub status: GrantStatus,
    /// When it was revoked or closed.
    #[serde(
        serialize_with = "rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<i64>,
    /// Who revoked or closed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

impl Grant {
    /// Whether tokens may be issued from it at `now_ms`.
    pub fn in_force(&self, now_ms: i64) -> bool {
        self.status == GrantStatus::Active && now_ms < self.expires_at
    }
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds when there are any).
pub fn ms_rfc3339(ms: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn rfc3339<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ms_rfc3339(*ms))
}

// serde hands `serialize_with` a reference to the field's type.
#[allow(clippy::ref_option)]
fn rfc3339_opt<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&ms_rfc3339(*ms)),
        None => s.serialize_none(),
    }
}

fn grant_from_row(row: GrantRow, now_ms: i64) -> Result<Grant, StoreError> {
    let (
        id,
        agent,
        agent_id,
        subject,
        scopes,
        constraints,
        purpose,
        task,
        approved_by,
        approved_at,
        created_at,
        expires_at,
        status,
        revoked_at,
        revoked_by,
    ) = row;
    let corrupt =
        |what: &str, why: String| StoreError::Corrupt(format!("grant {id}: {what}: {why}"));
    let scopes = serde_json::from_str(&scopes).map_err(|e| corrupt("scopes", e.to_string()))?;
    let constraints = constraints
        .map(|c| serde_json::from_str(&c))
        .transpose()
        .map_err(|e| corrupt("constraints", e.to_string()))?;
    let status = match GrantStatus::parse(&status) {
        Some(GrantStatus::Active) if now_ms >= expires_at => GrantStatus::Expired,
        Some(GrantStatus::Expired) | None => {
            return Err(corrupt("status", format!("unknown {status:?}")));
        }
        Some(s) => s,
    };
    Ok(Grant {
        id,
        agent,
        agent_id,
        subject,
        scopes,
        constraints,
        purpose,
        task,
        approved_by,
        approved_at,
        created_at,
        expires_at,
        status,
        revoked_at,
        revoked_by,
    })
}

fn grant_not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        what: format!("grant {id}"),
    }
}

/// Filters for [`Store::grants`]; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct GrantQuery {
    /// The agent's name.
    pub agent: Option<String>,
    /// The person.
    pub subject: Option<String>,
    /// Where it stands (expired: active with its time run out; active: still in force).
    pub status: Option<GrantStatus>,
    /// The task.
    pub task: Option<String>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// A delegation signing key as stored: its public JWK and its sealed private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredDelegationKey {
    /// Key id (first 16 hex characters of the SHA-256 of the public key).
    pub kid: String,
    /// The public key, as published.
    pub public_jwk: Jwk,
    /// The PKCS#8 private key sealed with the store key; opaque to the store.
    pub key_sealed: String,
    /// When it was created, unix milliseconds.
    pub created_at: i64,
}

impl fmt::Debug for StoredDelegationKey {
    // Even sealed, the key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredDelegationKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("key_sealed", &"<redacted>")
            .finish()
    }
}

impl Store {
    /// Stores a new, active grant. NotFound if its agent is not registered.
    pub async fn insert_grant(&self, g: &NewGrant) -> Result<Grant, StoreError> {
        let invalid = |what: &str, e: serde_json::Error| StoreError::Invalid {
            what: what.into(),
            why: e.to_string(),
        };
        let scopes = serde_json::to_string(&g.scopes).map_err(|e| invalid("scopes", e))?;
        let constraints = g
            .constraints
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| invalid("constraints", e))?;
        let result = on_pool!(self, pool => {
            sqlx::query(concat!(
                "INSERT INTO grants (", grant_columns!(), ") ",
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'active', NULL, NULL) \
                 ON CONFLICT (id) DO NOTHING"
            ))
            .bind(&g.id)
            .bind(&g.agent)
            .bind(&g.agent_id)
            .bind(&g.subject)
            .bind(&scopes)
            .bind(&constraints)
            .bind(&g.purpose)
            .bind(&g.task)
            .bind(&g.approved_by)
            .bind(g.approved_at)
            .bind(g.created_at)
            .bind(g.expires_at)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        });
        match result {
            Ok(1) => {}
            Ok(_) => {
                return Err(StoreError::Conflict {
                    what: format!("grant {}", g.id),
                    why: "already exists; create it again for a fresh id".into(),
                });
            }
            Err(sqlx::Error::Database(e)) if e.kind() == ErrorKind::ForeignKeyViolation => {
                return Err(StoreError::NotFound {
                    what: format!("agent {}", g.agent),
                });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Grant {
            id: g.id.clone(),
            agent: g.agent.clone(),
            agent_id: g.agent_id.clone(),
            subject: g.subject.clone(),
            scopes: g.scopes.clone(),
            constraints: g.constraints.clone(),
            purpose: g.purpose.clone(),
            task: g.task.clone(),
            approved_by: g.approved_by.clone(),
            approved_at: g.approved_at,
            created_at: g.created_at,
            expires_at: g.expires_at,
            status: GrantStatus::Active,
            revoked_at: None,
            revoked_by: None,
        })
    }

    /// One grant; NotFound if there is none. `now_ms` decides whether an active one has expired.
    pub async fn grant(&self, id: &str, now_ms: i64) -> Result<Grant, StoreError> {
        let row: Option<GrantRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!("SELECT ", grant_columns!(), " FROM grants WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        match row {
            Some(row) => grant_from_row(row, now_ms),
            None => Err(grant_not_found(id)),
        }
    }

    /// Grants matching `q`, newest first.
    pub async fn grants(&self, q: &GrantQuery, now_ms: i64) -> Result<Vec<Grant>, StoreError> {
        let mut select = Select::new(concat!("SELECT ", grant_columns!(), " FROM grants"));
        if let Some(agent) = &q.agent {
            select.filter("agent", "=", Arg::Text(agent.clone()));
        }
        if let Some(subject) = &q.subject {
            select.filter("subject", "=", Arg::Text(subject.clone()));
        }
        if let Some(task) = &q.task {
            select.filter("task", "=", Arg::Text(task.clone()));
        }
        match q.status {
            None => {}
            Some(GrantStatus::Active) => {
                select.filter("status", "=", Arg::Text("active".into()));
                select.filter("expires_at", ">", Arg::Int(now_ms));
            }
            Some(GrantStatus::Expired) => {
                select.filter("status", "=", Arg::Text("active".into()));
                select.filter("expires_at", "<=", Arg::Int(now_ms));
            }
            Some(status) => select.filter("status", "=", Arg::Text(status.as_str().into())),
        }
        let (sql, args) = select.finish("created_at DESC, id DESC", q.limit);
        let rows: Vec<GrantRow> = on_pool!(self, pool => {
            bind_all!(sqlx::query_as(&sql), &args).fetch_all(pool).await?
        });
        rows.into_iter()
            .map(|row| grant_from_row(row, now_ms))
            .collect()
    }

    /// Revokes an active (or expired) grant. Revoking a revoked grant changes nothing; a closed
    /// one is a Conflict. Announces [`Change::Delegation`] when it changed something.
    pub async fn revoke_grant(&self, id: &str, by: &str, now_ms: i64) -> Result<Grant, StoreError> {
        let (grant, changed) = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let changed = sqlx::query(
                "UPDATE grants SET status = 'revoked', revoked_at = $2, revoked_by = $3 \
                 WHERE id = $1 AND status = 'active'",
            )
            .bind(id)
            .bind(now_ms)
            .bind(by)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            let row: Option<GrantRow> =
                sqlx::query_as(concat!("SELECT ", grant_columns!(), " FROM grants WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(row) = row else {
                return Err(grant_not_found(id));
            };
            let grant = grant_from_row(row, now_ms)?;
            if grant.status == GrantStatus::Closed {
                return Err(StoreError::Conflict {
                    what: format!("grant {id}"),
                    why: "was closed with its task, which already ended it".into(),
                });
            }
            if changed {
                sqlx::query(BUMP_DELEGATION).execute(&mut *tx).await?;
                tx.notify(Change::Delegation).await?;
            }
            tx.commit().await?;
            (grant, changed)
        });
        if changed {
            self.announce(Change::Delegation);
        }
        Ok(grant)
    }

    /// Closes a task: every active (or expired) grant of it becomes closed. Returns the grants
    /// closed now (none if all were already ended); NotFound if no grant ever had this task.
    pub async fn close_task(
        &self,
        task: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        let closed = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let ids: Vec<(String,)> = sqlx::query_as(
                "UPDATE grants SET status = 'closed', revoked_at = $2, revoked_by = $3 \
                 WHERE task = $1 AND status = 'active' RETURNING id",
            )
            .bind(task)
            .bind(now_ms)
            .bind(by)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                let (any,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM grants WHERE task = $1")
                    .bind(task)
                    .fetch_one(&mut *tx)
                    .await?;
                if any == 0 {
                    return Err(StoreError::NotFound {
                        what: format!("task {task}"),
                    });
                }
                tx.commit().await?;
                Vec::new()
            } else {
                let rows: Vec<GrantRow> = sqlx::query_as(concat!(
                    "SELECT ", grant_columns!(), " FROM grants WHERE task = $1 ORDER BY created_at, id"
                ))
                .bind(task)
                .fetch_all(&mut *tx)
                .await?;
                sqlx::query(BUMP_DELEGATION).execute(&mut *tx).await?;
                tx.notify(Change::Delegation).await?;
                tx.commit().await?;
                let ids: std::collections::HashSet<String> =
                    ids.into_iter().map(|(id,)| id).collect();
                let mut closed = Vec::with_capacity(rows.len());
                for row in rows {
                    let grant = grant_from_row(row, now_ms)?;
                    if ids.contains(&grant.id) {
                        closed.push(grant);
                    }
                }
                closed
            }
        });
        if !closed.is_empty() {
            self.announce(Change::Delegation);
        }
        Ok(closed)
    }

    /// Every delegation signing key, oldest first.
    pub async fn delegation_keys(&self) -> Result<Vec<StoredDelegationKey>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT kid, public_jwk, key_sealed, created_at FROM delegation_keys \
                 ORDER BY created_at, kid",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(kid, jwk, key_sealed, created_at)| {
                let public_jwk = serde_json::from_str(&jwk).map_err(|e| {
                    StoreError::Corrupt(format!("delegation key {kid}: public_jwk: {e}"))
                })?;
                Ok(StoredDelegationKey {
                    kid,
                    public_jwk,
                    key_sealed,
                    created_at,
                })
            })
            .collect()
    }

    /// Stores a new signing key, unless another was created at or after `unless_newer_than`
    /// (unix milliseconds) in the meantime — by another replica rotating at the same moment.
    /// Returns whether it was stored; announces [`Change::Delegation`] if so.
    pub async fn insert_delegation_key(
        &self,
        key: &StoredDelegationKey,
        unless_newer_than: Option<i64>,
    ) -> Result<bool, StoreError> {
        let jwk = serde_json::to_string(&key.public_jwk).map_err(|e| StoreError::Invalid {
            what: "public_jwk".into(),
            why: e.to_string(),
        })?;
        let stored = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // Lock the state row first: a concurrent rotation waits here, then sees this key.
            sqlx::query("UPDATE state SET delegation_revision = delegation_revision WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            if let Some(threshold) = unless_newer_than {
                let (newest,): (Option<i64>,) =
                    sqlx::query_as("SELECT MAX(created_at) FROM delegation_keys")
                        .fetch_one(&mut *tx)
                        .await?;
                if newest.is_some_and(|n| n >= threshold) {
                    tx.rollback().await?;
                    return Ok(false);
                }
            }
            let inserted = sqlx::query(
                "INSERT INTO delegation_keys (kid, public_jwk, key_sealed, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (kid) DO NOTHING",
            )
            .bind(&key.kid)
            .bind(&jwk)
            .bind(&key.key_sealed)
            .bind(key.created_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::Conflict {
                    what: format!("delegation key {}", key.kid),
                    why: "is already stored; generate another".into(),
                });
            }
            sqlx::query(BUMP_DELEGATION).execute(&mut *tx).await?;
            tx.notify(Change::Delegation).await?;
            tx.commit().await?;
            true
        });
        if stored {
            self.announce(Change::Delegation);
        }
        Ok(stored)
    }

    /// The delegation revision.
    pub async fn delegation_revision(&self) -> Result<u64, StoreError> {
        let (revision,): (i64,) = on_pool!(self, pool => {
            sqlx::query_as("SELECT delegation_revision FROM state WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        u64::try_from(revision)
            .map_err(|_| StoreError::Corrupt(format!("delegation revision {revision}")))
    }

    /// Grants revoked or closed that have not expired yet at `now_ms`, by id.
    pub async fn revoked_grants(&self, now_ms: i64) -> Result<Vec<RevokedGrant>, StoreError> {
        let rows: Vec<(String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, expires_at FROM grants \
                 WHERE status IN ('revoked', 'closed') AND expires_at > $1 ORDER BY id",
            )
            .bind(now_ms)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, expires_at)| RevokedGrant {
                id,
                // Rounded up: a token from it may live until the grant's last second.
                expires_at: expires_at.div_euclid(1000) + i64::from(expires_at % 1000 != 0),
            })
            .collect())
    }

    /// What sidecars need at `now_ms`: the revision (read first, so the contents are never older
    /// than the revision they are labelled with), the keys `published` picks, and the revoked
    /// grants.
    pub async fn delegation_state(
        &self,
        now_ms: i64,
        published: impl FnOnce(&[StoredDelegationKey], i64) -> Vec<Jwk>,
    ) -> Result<DelegationState, StoreError> {
        let revision = self.delegation_revision().await?;
        let keys = self.delegation_keys().await?;
        let revoked_grants = self.revoked_grants(now_ms).await?;
        Ok(DelegationState {
            revision,
            keys: published(&keys, now_ms),
            revoked_grants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            GrantStatus::Active,
            GrantStatus::Revoked,
            GrantStatus::Closed,
            GrantStatus::Expired,
        ] {
            assert_eq!(GrantStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(GrantStatus::parse("Active"), None);
    }

    #[test]
    fn times_show_as_rfc3339() {
        assert_eq!(ms_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(ms_rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }

    #[test]
    fn the_sealed_key_stays_out_of_debug() {
        let key = StoredDelegationKey {
            kid: "k".into(),
            public_jwk: Jwk {
                kty: "EC".into(),
                crv: "P-256".into(),
                alg: "ES256".into(),
                key_use: "sig".into(),
                kid: "k".into(),
                x: String::new(),
                y: String::new(),
            },
            key_sealed: "c2VhbGVk".into(),
            created_at: 0,
        };
        assert!(!format!("{key:?}").contains("c2VhbGVk"));
    }
}
