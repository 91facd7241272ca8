//! Signed policy bundles: versions assigned in the inserting transaction, one of them active.

use std::collections::BTreeMap;

use super::backend::{BeginWrite as _, Notify as _, on_pool};
use super::{BundleSummary, Change, NewBundle, SignedBundle, Store, StoreError, now_rfc3339};

/// The columns [`SummaryRow`] decodes, in its order; needs `bundles b` and `state s` in scope.
macro_rules! summary_columns {
    () => {
        "b.version, b.digest, b.created_at, b.message, b.modules, b.tests_passed, \
         s.active_bundle_version"
    };
}

type SummaryRow = (i64, String, String, String, String, i64, Option<i64>);

fn summary_from_row(row: SummaryRow) -> Result<BundleSummary, StoreError> {
    let (version, digest, created_at, message, modules, tests_passed, active) = row;
    let corrupt = |why: String| StoreError::Corrupt(format!("bundle {version}: {why}"));
    let modules: BTreeMap<String, String> =
        serde_json::from_str(&modules).map_err(|e| corrupt(format!("modules: {e}")))?;
    Ok(BundleSummary {
        version: u64::try_from(version).map_err(|_| corrupt("negative version".into()))?,
        digest,
        created_at,
        message,
        modules: modules.into_keys().collect(),
        tests_passed: u64::try_from(tests_passed)
            .map_err(|_| corrupt("negative tests_passed".into()))?,
        active: active == Some(version),
    })
}

fn not_found(version: u64) -> StoreError {
    StoreError::NotFound {
        what: format!("bundle {version}"),
    }
}

impl Store {
    /// Stores a validated bundle under the next version and makes it active. `sign` receives that
    /// version and returns the bundle signed for it (same modules and data); if it fails, nothing
    /// is stored. Announces [`Change::Policy`].
    pub async fn insert_bundle<E>(
        &self,
        b: NewBundle,
        sign: impl FnOnce(u64) -> Result<SignedBundle, E>,
    ) -> Result<BundleSummary, StoreError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let tests_passed = i64::try_from(b.tests_passed).map_err(|_| StoreError::Invalid {
            what: "tests_passed".into(),
            why: format!("{} is too large", b.tests_passed),
        })?;
        let created_at = now_rfc3339();
        let summary = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // Lock the state row first: a concurrent insert (another replica's) waits here and
            // then sees this version, instead of picking the same one.
            sqlx::query("UPDATE state SET active_bundle_version = active_bundle_version WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            let (version,): (i64,) =
                sqlx::query_as("SELECT COALESCE(MAX(version), 0) + 1 FROM bundles")
                    .fetch_one(&mut *tx)
                    .await?;
            let signed = sign(version as u64).map_err(|e| StoreError::Sign(Box::new(e)))?;
            if signed.version != version as u64 || signed.modules != b.modules || signed.data != b.data {
                return Err(StoreError::Invalid {
                    what: "signed bundle".into(),
                    why: format!(
                        "was signed as version {} or for other modules or data than bundle {version} \
                         being stored",
                        signed.version
                    ),
                });
            }
            let modules = serde_json::to_string(&signed.modules).map_err(|e| StoreError::Invalid {
                what: "modules".into(),
                why: e.to_string(),
            })?;
            sqlx::query(
                "INSERT INTO bundles (version, digest, modules, data, signature, message, \
                 tests_passed, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(version)
            .bind(&signed.digest)
            .bind(&modules)
            .bind(&signed.data)
            .bind(&signed.signature)
            .bind(&b.message)
            .bind(tests_passed)
            .bind(&created_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE state SET active_bundle_version = $1 WHERE id = 1")
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.notify(Change::Policy).await?;
            tx.commit().await?;
            BundleSummary {
                version: version as u64,
                digest: signed.digest,
                created_at,
                message: b.message,
                modules: signed.modules.into_keys().collect(),
                tests_passed: b.tests_passed,
                active: true,
            }
        });
        self.announce(Change::Policy);
        Ok(summary)
    }

    /// Every stored bundle, newest first.
    pub async fn bundles(&self) -> Result<Vec<BundleSummary>, StoreError> {
        let rows: Vec<SummaryRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!(
                "SELECT ", summary_columns!(),
                " FROM bundles b CROSS JOIN state s WHERE s.id = 1 ORDER BY b.version DESC"
            ))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(summary_from_row).collect()
    }

    /// The bundle sidecars must enforce, if any was ever stored.
    pub async fn active_bundle(&self) -> Result<Option<SignedBundle>, StoreError> {
        let row: Option<(i64, String, String, String, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT b.version, b.digest, b.modules, b.data, b.signature \
                 FROM bundles b JOIN state s ON b.version = s.active_bundle_version WHERE s.id = 1",
            )
            .fetch_optional(pool)
            .await?
        });
        let Some((version, digest, modules, data, signature)) = row else {
            return Ok(None);
        };
        let corrupt = |why: String| StoreError::Corrupt(format!("bundle {version}: {why}"));
        Ok(Some(SignedBundle {
            version: u64::try_from(version).map_err(|_| corrupt("negative version".into()))?,
            digest,
            modules: serde_json::from_str(&modules)
                .map_err(|e| corrupt(format!("modules: {e}")))?,
            data,
            signature,
        }))
    }

    /// Makes a stored bundle the active one (rollback or roll forward); NotFound if there is no
    /// such version. Activating the active bundle changes nothing and announces nothing.
    pub async fn activate_bundle(&self, version: u64) -> Result<BundleSummary, StoreError> {
        let wanted = i64::try_from(version).map_err(|_| not_found(version))?;
        let (summary, changed) = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let row: Option<SummaryRow> = sqlx::query_as(concat!(
                "SELECT ", summary_columns!(),
                " FROM bundles b CROSS JOIN state s WHERE s.id = 1 AND b.version = $1"
            ))
            .bind(wanted)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Err(not_found(version));
            };
            let mut summary = summary_from_row(row)?;
            let changed = !summary.active;
            if changed {
                sqlx::query("UPDATE state SET active_bundle_version = $1 WHERE id = 1")
                    .bind(wanted)
                    .execute(&mut *tx)
                    .await?;
                tx.notify(Change::Policy).await?;
                tx.commit().await?;
                summary.active = true;
            }
            (summary, changed)
        });
        if changed {
            self.announce(Change::Policy);
        }
        Ok(summary)
    }
}
