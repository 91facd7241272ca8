//! Admin listener: `/metrics`, `/healthz`, `/readyz` and `/config` (never any secret), and
//! `POST /delegation/token`, through which the agent next to this sidecar obtains its delegation
//! tokens (the listener is loopback by default: only the agent's pod or host reaches it).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use mandate_wire::TokenRequest;

use crate::authz::Authorizer;
use crate::config::{Config, Mode};
use crate::delegation::ControlPlaneCalls;
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::sync::client::ClientError;

/// State the admin endpoints report on.
pub struct Admin {
    metrics: Arc<Metrics>,
    identity: Arc<IdentityStore>,
    /// Present when a policy is configured: readiness then needs a loaded policy.
    authz: Option<Arc<Authorizer>>,
    /// Managed mode: where delegation tokens are issued.
    control_plane: Option<Arc<dyn ControlPlaneCalls>>,
    /// Listeners bound and not draining.
    ready: Arc<AtomicBool>,
    /// The effective configuration minus identity, rendered once: it does not change at run time.
    config: serde_json::Value,
}

impl Admin {
    /// Admin state for a running sidecar.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        identity: Arc<IdentityStore>,
        authz: Option<Arc<Authorizer>>,
        control_plane: Option<Arc<dyn ControlPlaneCalls>>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        let routes: Vec<_> = config.routes.iter().map(|r| json!(r.as_ref())).collect();
        let mut rendered = json!({
            "trust_domain": config.trust_domain.as_str(),
            "outbound": config.outbound.to_string(),
            "inbound": config.inbound.to_string(),
            "app": config.app.map(|a| a.to_string()),
            "admin": config.admin.to_string(),
            "routes": routes,
            "workers": config.workers,
            "drain_timeout": humantime::format_duration(config.drain_timeout).to_string(),
            "log_format": config.log_format,
            "delegation_leeway": humantime::format_duration(config.delegation_leeway).to_string(),
            "policy": config.policy.as_ref().map(|p| json!({
                "source": p.source,
                "settings": p.settings,
                "enforcement": p.enforcement,
                "decision_log": p.decision_log,
            })),
        });
        match &config.mode {
            Mode::Standalone(files) => {
                rendered["mode"] = json!("standalone");
                rendered["identity_files"] = json!(files);
            }
            Mode::Managed(managed) => {
                rendered["mode"] = json!("managed");
                rendered["control_plane"] = json!(managed.control_plane.to_string());
                rendered["state_dir"] = json!(managed.state_dir);
                rendered["spool"] = json!(managed.spool);
                // The join token is a secret: say only whether one was given.
                rendered["join_token"] = json!(if managed.join_token.is_some() {
                    "given (not shown)"
                } else {
                    "none"
                });
            }
        }
        Self {
            metrics,
            identity,
            authz,
            control_plane,
            ready,
            config: rendered,
        }
    }

    /// Serves the admin endpoints until the process exits (they stay up while draining).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    async move {
                        let resp = if req.uri().path() == TOKEN_PATH {
                            this.delegation_token(req).await
                        } else {
                            this.handle(&req)
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.not_ready_reason() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
            },
            "/metrics" => {
                let mut resp = text(StatusCode::OK, self.metrics.render());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/config" => {
                let svid = &self.identity.current().svid;
                let mut config = self.config.clone();
                config["identity"] = json!({
                    "spiffe_id": svid.id.as_str(),
                    "serial": svid.serial,
                    "not_before": svid.not_before,
                    "not_after": svid.not_after,
                });
                let mut resp = text(StatusCode::OK, format!("{config:#}\n"));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz, /config or POST /delegation/token\n",
            ),
        }
    }

    /// `POST /delegation/token` `{grant_id, audience?}`: a delegation token from one of our
    /// agent's grants, issued by the control plane to our SVID (and bound to it). Answers the
    /// control plane's `IssuedToken`, or `{"error", "reason"}`.
    async fn delegation_token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST with {\"grant_id\": ID, \"audience\": [SPIFFE IDs] (optional)}",
            );
        }
        let Some(cp) = &self.control_plane else {
            return error(
                StatusCode::NOT_FOUND,
                "not_managed",
                "delegation tokens come from the control plane, and this sidecar runs standalone (no --control-plane)",
            );
        };
        let body = match Limited::new(req.into_body(), MAX_TOKEN_REQUEST)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                        "request body could not be read (at most {MAX_TOKEN_REQUEST} bytes): {e}"
                    ),
                );
            }
        };
        let request: TokenRequest = match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                        "body must be {{\"grant_id\": ID, \"audience\": [SPIFFE IDs] (optional)}}: {e}"
                    ),
                );
            }
        };
        let grant_id = request.grant_id.clone();
        match cp.issue_token(request).await {
            Ok(issued) => {
                tracing::info!(%grant_id, expires_at = issued.expires_at, "delegation token issued to the agent");
                json(
                    StatusCode::OK,
                    &serde_json::to_value(&issued).unwrap_or_default(),
                )
            }
            Err(ClientError::Api { status, error: why }) => {
                tracing::warn!(%grant_id, %status, error = %why, "the control plane refused a delegation token");
                let status = if status.is_client_error() {
                    status
                } else {
                    StatusCode::BAD_GATEWAY
                };
                error(status, "token_refused", &why)
            }
            Err(e) => {
                tracing::warn!(%grant_id, error = %e, "cannot obtain a delegation token");
                error(
                    StatusCode::BAD_GATEWAY,
                    "control_plane_unavailable",
                    &e.to_string(),
                )
            }
        }
    }

    fn not_ready_reason(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            Some("not ready: starting or draining\n".into())
        } else if !self.identity.is_valid_now() {
            Some("not ready: the SVID is outside its validity period\n".into())
        } else {
            self.authz
                .as_ref()
                .filter(|a| !a.has_policy())
                .map(|authz| {
                    format!(
                        "not ready: {} (see the log for why)\n",
                        authz.policy().missing_reason()
                    )
                })
        }
    }
}

/// Where the agent asks for a delegation token.
const TOKEN_PATH: &str = "/delegation/token";
/// Largest token request body read.
const MAX_TOKEN_REQUEST: usize = 16 * 1024;

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, error: &str, reason: &str) -> Response<Full<Bytes>> {
    json(status, &json!({"error": error, "reason": reason}))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
