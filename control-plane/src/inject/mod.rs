//! Kubernetes sidecar injection: the mutating admission webhook `mandate serve --webhook` serves
//! at `POST /inject`. For a pod annotated `mandate.dev/inject: "true"` it answers an
//! AdmissionReview v1 with a JSON Patch adding the iptables init container, the sidecar as a
//! native sidecar, its state volume and the scrape annotations; other pods, and pods already
//! injected, are admitted unchanged; a pod it cannot inject safely is refused with a message
//! naming what to fix. A malformed review gets HTTP 400.

pub mod annotations;
pub mod config;
pub mod patch;
pub mod plan;
pub mod pod;
pub mod review;
pub mod tls;
pub mod values;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mandate_identity::TrustDomain;

use crate::api::error::HttpError;
use config::InjectorConfig;
use plan::Verdict;
use pod::Pod;
use review::{AdmissionRequest, AdmissionResponse, AdmissionReview, ReviewResponse, Status};

/// The webhook's path (the MutatingWebhookConfiguration's `clientConfig.service.path`).
pub const PATH: &str = "/inject";
/// Largest review accepted: a pod is at most about 1.5 MiB (etcd's limit), with room to spare.
pub const BODY_LIMIT: usize = 4 << 20;

/// Answers admission reviews with the injector's configuration and the mesh's trust domain.
#[derive(Clone)]
pub struct Injector {
    config: Arc<InjectorConfig>,
    trust_domain: TrustDomain,
}

/// How a review ended, for the log and the `mandate_cp_injector_reviews_total` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Admitted unchanged.
    Skipped,
    /// Refused admission.
    Refused,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Refused => "refused",
        }
    }
}

impl Injector {
    /// An injector giving sidecars `config` and identities in `trust_domain`.
    pub fn new(config: InjectorConfig, trust_domain: TrustDomain) -> Self {
        Self {
            config: Arc::new(config),
            trust_domain,
        }
    }

    /// Answers the AdmissionReview in `body`; an error is a malformed review (HTTP 400) naming
    /// the field at fault.
    pub fn review(&self, body: &[u8]) -> Result<(ReviewResponse, Outcome), HttpError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let review: AdmissionReview = serde_path_to_error::deserialize(de).map_err(|e| {
            malformed(
                None,
                e.path(),
                format!("not an AdmissionReview: {}", e.inner()),
            )
        })?;
        if review.api_version != review::API_VERSION || review.kind != review::KIND {
            return Err(HttpError::invalid(
                "apiVersion",
                format!(
                    "expected apiVersion {} and kind {}, got {} {} (set admissionReviewVersions: [v1])",
                    review::API_VERSION,
                    review::KIND,
                    review.api_version,
                    review.kind
                ),
            ));
        }
        let request = review
            .request
            .ok_or_else(|| HttpError::invalid("request", "the review carries no request"))?;
        if request.uid.is_empty() {
            return Err(HttpError::invalid("request.uid", "must not be empty"));
        }
        let (response, outcome) = self.answer(&request)?;
        Ok((ReviewResponse::new(response), outcome))
    }

    fn answer(
        &self,
        request: &AdmissionRequest,
    ) -> Result<(AdmissionResponse, Outcome), HttpError> {
        let verdict = |allowed: bool| AdmissionResponse {
            uid: request.uid.clone(),
            allowed,
            status: None,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        };
        if !request.kind.is_pod() {
            let message = format!(
                "the Mandate injector handles only v1 Pods, not {}; check the \
                 MutatingWebhookConfiguration's rules",
                request.kind
            );
            tracing::warn!(uid = %request.uid, kind = %request.kind, "refused a review of something other than a pod");
            return Ok((refused(verdict(false), message), Outcome::Refused));
        }
        if request.operation != "CREATE" {
            // Containers cannot be added to an existing pod; injection happens at creation only.
            return Ok((verdict(true), Outcome::Skipped));
        }
        let object = request.object.as_ref().ok_or_else(|| {
            HttpError::invalid("request.object", "a CREATE review must carry the pod")
        })?;
        let pod: Pod = serde_path_to_error::deserialize(object).map_err(|e| {
            malformed(
                Some("request.object"),
                e.path(),
                format!("not a v1 Pod: {}", e.inner()),
            )
        })?;
        let namespace = request.namespace.as_deref().unwrap_or("");
        let name = pod
            .metadata
            .name
            .as_deref()
            .or(pod.metadata.generate_name.as_deref())
            .unwrap_or("");
        match plan::decide(&pod, &self.config) {
            Verdict::Skip(why) => {
                tracing::debug!(uid = %request.uid, namespace, pod = name, why, "pod admitted unchanged");
                Ok((verdict(true), Outcome::Skipped))
            }
            Verdict::Refuse(message) => {
                tracing::info!(uid = %request.uid, namespace, pod = name, reason = %message, "pod refused");
                Ok((refused(verdict(false), message), Outcome::Refused))
            }
            Verdict::Inject(plan) => {
                let ops = patch::build(&pod, &plan, &self.config, &self.trust_domain);
                let json = serde_json::to_vec(&ops).expect("a patch serialises");
                tracing::info!(
                    uid = %request.uid,
                    namespace,
                    pod = name,
                    join_token_secret = %plan.join_token_secret,
                    app_port = plan.app_port.map(|p| p.get()),
                    warnings = plan.warnings.len(),
                    "sidecar injected"
                );
                let mut response = verdict(true);
                response.patch_type = Some("JSONPatch");
                response.patch = Some(STANDARD.encode(json));
                response.warnings = plan.warnings;
                Ok((response, Outcome::Injected))
            }
        }
    }
}

/// HTTP 400 naming the field at `path` (under `prefix`), or the whole body when the path is
/// the root.
fn malformed(prefix: Option<&str>, path: &serde_path_to_error::Path, why: String) -> HttpError {
    let path = path.to_string();
    let field = match (prefix, path.as_str()) {
        // "." is the root; "?" a position serde could not name (e.g. the body ends inside a map).
        (None, "." | "?") => return HttpError::new(StatusCode::BAD_REQUEST, why),
        (Some(prefix), "." | "?") => prefix.to_owned(),
        (Some(prefix), path) => format!("{prefix}.{path}"),
        (None, _) => path,
    };
    HttpError::invalid(field, why)
}

fn refused(mut response: AdmissionResponse, message: String) -> AdmissionResponse {
    response.status = Some(Status {
        code: StatusCode::FORBIDDEN.as_u16(),
        message,
    });
    response
}

/// The webhook's routes: `POST /inject` only.
pub fn router(injector: Injector) -> Router {
    Router::new()
        .route(PATH, post(inject))
        .fallback(|| async {
            HttpError::not_found(format!("no such endpoint; the webhook is POST {PATH}"))
        })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("the webhook is POST {PATH}"),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(injector)
}

async fn inject(
    State(injector): State<Injector>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let metrics = crate::metrics::metrics();
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        metrics
            .injector_reviews
            .with_label_values(&["malformed"])
            .inc();
        return HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/json (an AdmissionReview)",
        )
        .into_response();
    }
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            metrics
                .injector_reviews
                .with_label_values(&["malformed"])
                .inc();
            return HttpError::new(
                e.status(),
                format!("cannot read the review: {}", e.body_text()),
            )
            .into_response();
        }
    };
    match injector.review(&body) {
        Ok((review, outcome)) => {
            metrics
                .injector_reviews
                .with_label_values(&[outcome.label()])
                .inc();
            axum::Json(review).into_response()
        }
        Err(e) => {
            metrics
                .injector_reviews
                .with_label_values(&["malformed"])
                .inc();
            tracing::info!(error = %e.body.error, field = ?e.body.field, "malformed admission review");
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn injector() -> Injector {
        Injector::new(
            InjectorConfig::parse(
                "image: mandate:test\ncontrol-plane: https://cp:15012\n",
                Path::new("inject.yaml"),
            )
            .unwrap(),
            "example.org".parse().unwrap(),
        )
    }

    fn review(request: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request
        })
    }

    fn answer(body: serde_json::Value) -> Result<serde_json::Value, HttpError> {
        injector()
            .review(&serde_json::to_vec(&body).unwrap())
            .map(|(r, _)| serde_json::to_value(r).unwrap())
    }

    #[test]
    fn malformed_reviews_name_the_field() {
        let err = |body: serde_json::Value| answer(body).unwrap_err();
        let e = err(
            serde_json::json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": null}),
        );
        assert_eq!(e.body.field.as_deref(), Some("apiVersion"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            err(review(serde_json::Value::Null)).body.field.as_deref(),
            Some("request")
        );
        let e = err(review(
            serde_json::json!({"uid": "u", "kind": {"version": "v1", "kind": "Pod"}}),
        ));
        assert_eq!(e.body.field.as_deref(), Some("request"));
        assert!(
            e.body.error.contains("missing field `operation`"),
            "{}",
            e.body.error
        );
        let e = err(review(serde_json::json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE"
        })));
        assert_eq!(e.body.field.as_deref(), Some("request.object"));
        let e = err(review(serde_json::json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
            "object": {"spec": {"containers": [{"name": "a", "ports": [{"containerPort": "x"}]}]}}
        })));
        assert_eq!(
            e.body.field.as_deref(),
            Some("request.object.spec.containers[0].ports[0].containerPort")
        );
        let e = err(review(serde_json::json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
            "object": "a pod"
        })));
        assert_eq!(e.body.field.as_deref(), Some("request.object"));
        let e = injector().review(b"{").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.field, None, "a syntax error is about the whole body");
    }

    #[test]
    fn other_kinds_are_refused_and_other_operations_admitted_unchanged() {
        let deployment = answer(review(serde_json::json!({
            "uid": "u1", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "operation": "CREATE", "object": {}
        })))
        .unwrap();
        assert_eq!(deployment["response"]["allowed"], false);
        assert!(
            deployment["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("apps/v1 Deployment")
        );
        let update = answer(review(serde_json::json!({
            "uid": "u2", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "UPDATE", "object": {"metadata": {"annotations": {"mandate.dev/inject": "true"}}}
        })))
        .unwrap();
        assert_eq!(
            update["response"],
            serde_json::json!({"uid": "u2", "allowed": true})
        );
    }
}
