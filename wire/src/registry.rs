//! The registry as sidecars receive it and policy reads it (`data.registry.agents.<name>`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::reach::Reach;

/// Whether a workload may act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadStatus {
    /// Registered and allowed to act within its ceiling.
    Active,
    /// Temporarily stopped: calls denied, connections cut, certificate refused; may be reactivated.
    Suspended,
    /// Permanently stopped: as suspended, and never reactivated.
    Revoked,
}

impl WorkloadStatus {
    /// The lowercase word used in the API, the store and policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the lowercase word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

impl std::fmt::Display for WorkloadStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registered agent or service, as policy sees it in `input.registry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Status: only `active` workloads may act.
    pub status: WorkloadStatus,
    /// Who answers for it (a person or team).
    pub owner: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The most it may ever do: scope objects (see policies/README.md).
    #[serde(default)]
    pub ceiling: Vec<Value>,
    /// What it may do on its own, with no delegation from a person: scope objects. The reference
    /// policy intersects them with the ceiling, so an autonomous scope wider than the ceiling
    /// grants only what the ceiling allows.
    #[serde(default)]
    pub autonomous: Vec<Value>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh; sidecars route these addresses to it.
    #[serde(default, skip_serializing_if = "Reach::is_empty")]
    pub reach: Reach,
}

/// The whole registry at one revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Monotonic revision; a sidecar resumes its stream from the last one it applied.
    pub revision: u64,
    /// Agents by name.
    pub agents: BTreeMap<String, RegistryEntry>,
    /// Services by name.
    pub services: BTreeMap<String, RegistryEntry>,
}

impl Registry {
    /// Entries whose status is not active: their calls are denied and their certificates refused.
    pub fn inactive(&self) -> impl Iterator<Item = &RegistryEntry> {
        self.agents
            .values()
            .chain(self.services.values())
            .filter(|e| e.status != WorkloadStatus::Active)
    }

    /// The SPIFFE IDs of the [`inactive`](Self::inactive) entries.
    pub fn inactive_ids(&self) -> impl Iterator<Item = &str> {
        self.inactive().map(|e| e.spiffe_id.as_str())
    }

    /// The entry for a SPIFFE ID, if registered.
    pub fn entry_for(&self, spiffe_id: &str) -> Option<&RegistryEntry> {
        self.agents
            .values()
            .chain(self.services.values())
            .find(|e| e.spiffe_id == spiffe_id)
    }

    /// The `registry` document policy sees as `data.registry` (revision left out).
    pub fn policy_data(&self) -> Value {
        serde_json::json!({ "agents": self.agents, "services": self.services })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, status: WorkloadStatus) -> RegistryEntry {
        RegistryEntry {
            spiffe_id: id.into(),
            status,
            owner: "alice".into(),
            description: String::new(),
            ceiling: vec![],
            autonomous: vec![],
            labels: BTreeMap::new(),
            reach: Reach::default(),
        }
    }

    #[test]
    fn inactive_ids_are_the_suspended_and_revoked_ones() {
        let mut registry = Registry::default();
        registry.agents.insert(
            "a".into(),
            entry("spiffe://td/agent/a", WorkloadStatus::Active),
        );
        registry.agents.insert(
            "b".into(),
            entry("spiffe://td/agent/b", WorkloadStatus::Suspended),
        );
        registry.services.insert(
            "c".into(),
            entry("spiffe://td/service/c", WorkloadStatus::Revoked),
        );
        let inactive: Vec<_> = registry.inactive_ids().collect();
        assert_eq!(inactive, ["spiffe://td/agent/b", "spiffe://td/service/c"]);
        assert_eq!(
            registry.entry_for("spiffe://td/agent/a").unwrap().status,
            WorkloadStatus::Active
        );
        assert!(registry.entry_for("spiffe://td/agent/z").is_none());
    }

    #[test]
    fn policy_data_has_the_reference_policy_shape() {
        let mut registry = Registry {
            revision: 7,
            ..Default::default()
        };
        registry.agents.insert(
            "a".into(),
            entry("spiffe://td/agent/a", WorkloadStatus::Active),
        );
        let data = registry.policy_data();
        assert_eq!(data["agents"]["a"]["status"], "active");
        assert_eq!(data["services"], serde_json::json!({}));
        assert!(data.get("revision").is_none());
    }

    #[test]
    fn autonomous_scopes_default_to_none() {
        let old: RegistryEntry = serde_json::from_str(
            r#"{"spiffe_id":"x","status":"active","owner":"o","ceiling":[{"host":"tool"}]}"#,
        )
        .unwrap();
        assert!(old.autonomous.is_empty());
        let new: RegistryEntry = serde_json::from_str(
            r#"{"spiffe_id":"x","status":"active","owner":"o","autonomous":[{"tool":"search"}]}"#,
        )
        .unwrap();
        assert_eq!(new.autonomous, [serde_json::json!({"tool": "search"})]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<RegistryEntry>(
            r#"{"spiffe_id":"x","status":"active","owner":"o","colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
