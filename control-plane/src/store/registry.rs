//! The CA row, the registry of workloads (with its revision) and join tokens.

use std::collections::BTreeMap;

use sqlx::error::ErrorKind;

use super::backend::{BeginWrite as _, Notify as _, on_pool};
use super::{
    Change, JoinTokenRefusal, NewWorkload, Registry, RegistryEntry, Store, StoreError,
    StoredSecret, Workload, WorkloadKind, WorkloadStatus, now_rfc3339,
};

/// The columns [`WorkloadRow`] decodes, in its order.
macro_rules! workload_columns {
    () => {
        "name, kind, spiffe_id, owner, description, ceiling, autonomous, labels, status, created_at, \
         updated_at, reach"
    };
}

type WorkloadRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

const BUMP_REVISION: &str =
    "UPDATE state SET registry_revision = registry_revision + 1 WHERE id = 1";

fn workload_from_row(row: WorkloadRow) -> Result<Workload, StoreError> {
    let (
        name,
        kind,
        spiffe_id,
        owner,
        description,
        ceiling,
        autonomous,
        labels,
        status,
        created_at,
        updated_at,
        reach,
    ) = row;
    let corrupt =
        |what: &str, why: String| StoreError::Corrupt(format!("{kind} {name}: {what}: {why}"));
    let kind_parsed =
        WorkloadKind::parse(&kind).ok_or_else(|| corrupt("kind", format!("unknown {kind:?}")))?;
    let status = WorkloadStatus::parse(&status)
        .ok_or_else(|| corrupt("status", format!("unknown {status:?}")))?;
    let ceiling = serde_json::from_str(&ceiling).map_err(|e| corrupt("ceiling", e.to_string()))?;
    let autonomous =
        serde_json::from_str(&autonomous).map_err(|e| corrupt("autonomous", e.to_string()))?;
    let labels = serde_json::from_str(&labels).map_err(|e| corrupt("labels", e.to_string()))?;
    let reach = serde_json::from_str(&reach).map_err(|e| corrupt("reach", e.to_string()))?;
    Ok(Workload {
        name,
        kind: kind_parsed,
        spiffe_id,
        owner,
        description,
        ceiling,
        autonomous,
        labels,
        reach,
        status,
        created_at,
        updated_at,
    })
}

fn named(kind: WorkloadKind, name: &str) -> String {
    format!("{kind} {name}")
}

impl Store {
    /// The stored CA, if one was generated or imported.
    pub async fn ca(&self) -> Result<Option<StoredSecret>, StoreError> {
        let row: Option<(String, String)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT cert_pem, key_sealed FROM ca WHERE id = 1")
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(cert_pem, key_sealed)| StoredSecret {
            cert_pem,
            key_sealed,
        }))
    }

    /// Stores the CA; refuses to replace an existing one unless `replace`.
    pub async fn put_ca(&self, ca: &StoredSecret, replace: bool) -> Result<(), StoreError> {
        let sql = if replace {
            "INSERT INTO ca (id, cert_pem, key_sealed, updated_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET cert_pem = excluded.cert_pem, \
             key_sealed = excluded.key_sealed, updated_at = excluded.updated_at"
        } else {
            "INSERT INTO ca (id, cert_pem, key_sealed, updated_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING"
        };
        let now = now_rfc3339();
        let written = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(&ca.cert_pem)
                .bind(&ca.key_sealed)
                .bind(&now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if written == 0 {
            return Err(StoreError::Conflict {
                what: "the CA".into(),
                why: "is already stored; replace it deliberately (`mandate ca import --force`)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Registers a workload (active). Conflict if its name is taken for its kind, or its SPIFFE ID at all.
    pub async fn insert_workload(&self, w: &NewWorkload) -> Result<Workload, StoreError> {
        let invalid = |what: &str, e: serde_json::Error| StoreError::Invalid {
            what: what.into(),
            why: e.to_string(),
        };
        let ceiling = serde_json::to_string(&w.ceiling).map_err(|e| invalid("ceiling", e))?;
        let autonomous =
            serde_json::to_string(&w.autonomous).map_err(|e| invalid("autonomous", e))?;
        let labels = serde_json::to_string(&w.labels).map_err(|e| invalid("labels", e))?;
        let reach = serde_json::to_string(&w.reach).map_err(|e| invalid("reach", e))?;
        let now = now_rfc3339();
        let status = WorkloadStatus::Active;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // DO NOTHING rather than catching the unique violation: on PostgreSQL an error would
            // abort the transaction before we could look up which name was taken.
            let inserted = sqlx::query(concat!(
                "INSERT INTO workloads (", workload_columns!(), ") ",
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11) ON CONFLICT DO NOTHING"
            ))
            .bind(&w.name)
            .bind(w.kind.as_str())
            .bind(&w.spiffe_id)
            .bind(&w.owner)
            .bind(&w.description)
            .bind(&ceiling)
            .bind(&autonomous)
            .bind(&labels)
            .bind(status.as_str())
            .bind(&now)
            .bind(&reach)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                let taken: Option<(String,)> =
                    sqlx::query_as("SELECT spiffe_id FROM workloads WHERE kind = $1 AND name = $2")
                        .bind(w.kind.as_str())
                        .bind(&w.name)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match taken {
                    Some(_) => StoreError::Conflict {
                        what: named(w.kind, &w.name),
                        why: "is already registered; pick another name".into(),
                    },
                    None => StoreError::Conflict {
                        what: format!("SPIFFE ID {}", w.spiffe_id),
                        why: "already belongs to another workload".into(),
                    },
                });
            }
            sqlx::query(BUMP_REVISION).execute(&mut *tx).await?;
            tx.notify(Change::Registry).await?;
            tx.commit().await?;
        });
        self.announce(Change::Registry);
        Ok(Workload {
            name: w.name.clone(),
            kind: w.kind,
            spiffe_id: w.spiffe_id.clone(),
            owner: w.owner.clone(),
            description: w.description.clone(),
            ceiling: w.ceiling.clone(),
            autonomous: w.autonomous.clone(),
            labels: w.labels.clone(),
            reach: w.reach.clone(),
            status,
            created_at: now.clone(),
            updated_at: now,
        })
    }

    /// One workload by kind and name; NotFound if there is none.
    pub async fn workload(&self, kind: WorkloadKind, name: &str) -> Result<Workload, StoreError> {
        let row: Option<WorkloadRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!(
                "SELECT ", workload_columns!(), " FROM workloads WHERE kind = $1 AND name = $2"
            ))
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(pool)
            .await?
        });
        match row {
            Some(row) => workload_from_row(row),
            None => Err(StoreError::NotFound {
                what: named(kind, name),
            }),
        }
    }

    /// The workload a certificate's SPIFFE ID names, if registered.
    pub async fn workload_by_spiffe_id(&self, id: &str) -> Result<Option<Workload>, StoreError> {
        let row: Option<WorkloadRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!(
                "SELECT ", workload_columns!(), " FROM workloads WHERE spiffe_id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(workload_from_row).transpose()
    }

    /// All workloads (of one kind, or both), by kind then name.
    pub async fn workloads(&self, kind: Option<WorkloadKind>) -> Result<Vec<Workload>, StoreError> {
        let rows: Vec<WorkloadRow> = on_pool!(self, pool => {
            match kind {
                Some(kind) => sqlx::query_as(concat!(
                    "SELECT ", workload_columns!(),
                    " FROM workloads WHERE kind = $1 ORDER BY name"
                ))
                .bind(kind.as_str())
                .fetch_all(pool)
                .await?,
                None => sqlx::query_as(concat!(
                    "SELECT ", workload_columns!(), " FROM workloads ORDER BY kind, name"
                ))
                .fetch_all(pool)
                .await?,
            }
        });
        rows.into_iter().map(workload_from_row).collect()
    }

    /// Changes a workload's status. The same status is a no-op (no revision bump); revoked is
    /// terminal, so any change away from it is a Conflict.
    pub async fn set_status(
        &self,
        kind: WorkloadKind,
        name: &str,
        status: WorkloadStatus,
    ) -> Result<Workload, StoreError> {
        let now = now_rfc3339();
        let (workload, changed) = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // The guard is in the UPDATE itself, so on PostgreSQL a concurrent revoke is re-checked
            // after its row lock is released rather than read beforehand and raced.
            let changed = sqlx::query(
                "UPDATE workloads SET status = $1, updated_at = $2 \
                 WHERE kind = $3 AND name = $4 AND status <> 'revoked' AND status <> $1",
            )
            .bind(status.as_str())
            .bind(&now)
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            let row: Option<WorkloadRow> = sqlx::query_as(concat!(
                "SELECT ", workload_columns!(), " FROM workloads WHERE kind = $1 AND name = $2"
            ))
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Err(StoreError::NotFound { what: named(kind, name) });
            };
            let workload = workload_from_row(row)?;
            if !changed && workload.status != status {
                return Err(StoreError::Conflict {
                    what: named(kind, name),
                    why: "is revoked, and revocation is final; register a new workload instead"
                        .into(),
                });
            }
            if changed {
                sqlx::query(BUMP_REVISION).execute(&mut *tx).await?;
                tx.notify(Change::Registry).await?;
            }
            tx.commit().await?;
            (workload, changed)
        });
        if changed {
            self.announce(Change::Registry);
        }
        Ok(workload)
    }

    /// The whole registry with its revision, read in one statement so the two always agree.
    pub async fn registry(&self) -> Result<Registry, StoreError> {
        type Row = (
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.registry_revision, w.kind, w.name, w.spiffe_id, w.status, w.owner, \
                 w.description, w.ceiling, w.autonomous, w.labels, w.reach \
                 FROM state s LEFT JOIN workloads w ON 1 = 1 WHERE s.id = 1",
            )
            .fetch_all(pool)
            .await?
        });
        let mut registry = Registry::default();
        for (
            revision,
            kind,
            name,
            spiffe_id,
            status,
            owner,
            description,
            ceiling,
            autonomous,
            labels,
            reach,
        ) in rows
        {
            registry.revision = u64::try_from(revision)
                .map_err(|_| StoreError::Corrupt(format!("registry revision {revision}")))?;
            let (
                Some(kind),
                Some(name),
                Some(spiffe_id),
                Some(status),
                Some(owner),
                Some(description),
                Some(ceiling),
                Some(autonomous),
                Some(labels),
                Some(reach),
            ) = (
                kind,
                name,
                spiffe_id,
                status,
                owner,
                description,
                ceiling,
                autonomous,
                labels,
                reach,
            )
            else {
                // The one row of an empty registry: the revision and no workload.
                continue;
            };
            let corrupt = |what: &str, why: String| {
                StoreError::Corrupt(format!("{kind} {name}: {what}: {why}"))
            };
            let entry = RegistryEntry {
                spiffe_id,
                status: WorkloadStatus::parse(&status)
                    .ok_or_else(|| corrupt("status", format!("unknown {status:?}")))?,
                owner,
                description,
                ceiling: serde_json::from_str(&ceiling)
                    .map_err(|e| corrupt("ceiling", e.to_string()))?,
                autonomous: serde_json::from_str(&autonomous)
                    .map_err(|e| corrupt("autonomous", e.to_string()))?,
                labels: serde_json::from_str::<BTreeMap<String, String>>(&labels)
                    .map_err(|e| corrupt("labels", e.to_string()))?,
                reach: serde_json::from_str(&reach).map_err(|e| corrupt("reach", e.to_string()))?,
            };
            match WorkloadKind::parse(&kind) {
                Some(WorkloadKind::Agent) => registry.agents.insert(name, entry),
                Some(WorkloadKind::Service) => registry.services.insert(name, entry),
                None => return Err(corrupt("kind", format!("unknown {kind:?}"))),
            };
        }
        Ok(registry)
    }

    /// Keeps a join token's hash for a registered workload; NotFound if no workload has that SPIFFE ID.
    pub async fn insert_join_token(
        &self,
        secret_hash: &str,
        spiffe_id: &str,
        expires_at_unix: i64,
    ) -> Result<(), StoreError> {
        let result = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO join_tokens (secret_hash, spiffe_id, expires_at, used_at) \
                 VALUES ($1, $2, $3, NULL) ON CONFLICT (secret_hash) DO NOTHING",
            )
            .bind(secret_hash)
            .bind(spiffe_id)
            .bind(expires_at_unix)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        });
        match result {
            Ok(1) => Ok(()),
            // Only a broken random generator repeats a secret; say so rather than reuse it.
            Ok(_) => Err(StoreError::Conflict {
                what: "join token".into(),
                why: "is already stored; issue another".into(),
            }),
            Err(sqlx::Error::Database(e)) if e.kind() == ErrorKind::ForeignKeyViolation => {
                Err(StoreError::NotFound {
                    what: format!("workload {spiffe_id}"),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Redeems a join token once: the first caller gets its SPIFFE ID, every later one `Used`.
    pub async fn redeem_join_token(
        &self,
        secret_hash: &str,
        now_unix: i64,
    ) -> Result<String, StoreError> {
        on_pool!(self, pool => {
            // One conditional UPDATE decides: of two concurrent redeems only one matches
            // `used_at IS NULL`; the other finds the row already used.
            let won: Option<(String,)> = sqlx::query_as(
                "UPDATE join_tokens SET used_at = $2 \
                 WHERE secret_hash = $1 AND used_at IS NULL AND expires_at > $2 \
                 RETURNING spiffe_id",
            )
            .bind(secret_hash)
            .bind(now_unix)
            .fetch_optional(pool)
            .await?;
            if let Some((spiffe_id,)) = won {
                return Ok(spiffe_id);
            }
            let why: Option<(Option<i64>,)> =
                sqlx::query_as("SELECT used_at FROM join_tokens WHERE secret_hash = $1")
                    .bind(secret_hash)
                    .fetch_optional(pool)
                    .await?;
            Err(StoreError::JoinToken(match why {
                None => JoinTokenRefusal::Unknown,
                Some((Some(_),)) => JoinTokenRefusal::Used,
                Some((None,)) => JoinTokenRefusal::Expired,
            }))
        })
    }
}
