//! AdmissionReview v1 (`admission.k8s.io/v1`), as the kube-apiserver sends it to a mutating
//! webhook and expects it back: only the fields the injector reads or writes. Unknown fields are
//! ignored, since the schema is Kubernetes' and grows with each release.

use serde::{Deserialize, Serialize};

/// The `apiVersion` of the reviews understood and answered.
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The `kind` of a review.
pub const KIND: &str = "AdmissionReview";

/// A review as received.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// The admission request (absent only in a malformed review).
    pub request: Option<AdmissionRequest>,
}

/// What is being admitted.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Identifies this request; echoed in the response.
    pub uid: String,
    /// The kind of object (`{"group":"","version":"v1","kind":"Pod"}` for pods).
    pub kind: GroupVersionKind,
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: String,
    /// The namespace of the object (a pod being created may not carry it in its metadata yet).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The object as it would be stored (absent for DELETE).
    #[serde(default)]
    pub object: Option<serde_json::Value>,
}

/// A Kubernetes group, version and kind.
#[derive(Debug, Deserialize)]
pub struct GroupVersionKind {
    /// The API group; empty for the core group.
    #[serde(default)]
    pub group: String,
    /// The version, e.g. `v1`.
    pub version: String,
    /// The kind, e.g. `Pod`.
    pub kind: String,
}

impl GroupVersionKind {
    /// Whether this is a core `v1` `Pod`.
    pub fn is_pod(&self) -> bool {
        self.group.is_empty() && self.version == "v1" && self.kind == "Pod"
    }
}

impl std::fmt::Display for GroupVersionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{} {}", self.version, self.kind)
        } else {
            write!(f, "{}/{} {}", self.group, self.version, self.kind)
        }
    }
}

/// The review sent back.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    /// [`API_VERSION`].
    pub api_version: &'static str,
    /// [`KIND`].
    pub kind: &'static str,
    /// The verdict.
    pub response: AdmissionResponse,
}

impl ReviewResponse {
    /// Wraps a verdict.
    pub fn new(response: AdmissionResponse) -> Self {
        Self {
            api_version: API_VERSION,
            kind: KIND,
            response,
        }
    }
}

/// The verdict on one request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's `uid`.
    pub uid: String,
    /// Whether the object may be admitted.
    pub allowed: bool,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `JSONPatch` when `patch` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// The RFC 6902 JSON Patch, base64 (standard alphabet, padded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Warnings the API server passes on to the client that created the object.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The reason of a refusal (a subset of `meta/v1` Status).
#[derive(Debug, Serialize)]
pub struct Status {
    /// An HTTP-like status code (403: the injector will not admit this pod as it is).
    pub code: u16,
    /// What is wrong and what to do; shown to the user by kubectl.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_of_the_api_server_are_ignored() {
        let review: AdmissionReview = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "dryRun": false,
                "someFutureField": {"x": 1}
            }
        }))
        .unwrap();
        let request = review.request.unwrap();
        assert!(request.kind.is_pod());
        assert!(request.object.is_none());
    }

    #[test]
    fn a_verdict_without_patch_or_warnings_omits_them() {
        let json = serde_json::to_value(ReviewResponse::new(AdmissionResponse {
            uid: "u1".into(),
            allowed: true,
            status: None,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        }))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": "u1", "allowed": true}
            })
        );
    }
}
