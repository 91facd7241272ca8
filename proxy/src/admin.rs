//! Admin listener: `/metrics`, `/healthz`, `/readyz` and `/config` (never any secret).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::authz::Authorizer;
use crate::config::{Config, Mode};
use crate::identity::IdentityStore;
use crate::metrics::Metrics;

/// State the admin endpoints report on.
pub struct Admin {
    metrics: Arc<Metrics>,
    identity: Arc<IdentityStore>,
    /// Present when a policy is configured: readiness then needs a loaded policy.
    authz: Option<Arc<Authorizer>>,
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
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(&req)) }
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
                "not found: try /metrics, /healthz, /readyz or /config\n",
            ),
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

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
