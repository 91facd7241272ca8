//! Inbound: terminate mTLS from other sidecars, learn the caller's SPIFFE ID from its verified
//! certificate, stamp identity headers and forward to the local app.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Request, Response, StatusCode, header};
use http_body_util::Either;
use hyper::body::Incoming;
use mandate_identity::svid::check_svid;
use mandate_identity::{SpiffeId, TrustDomain};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::approval::{APPROVED_BY, approval_id};
use crate::authz::{AuthorizedHttp, Authorizer, Credentials, DECISION_ID, Decision};
use crate::delegation::{
    self, APPROVAL, ControlPlaneCalls, DELEGATION, Exchanges, Presented, Presenter, Verifier,
};
use crate::headers::{ProxyBody, json_response, strip_identity_headers};
use crate::identity::IdentityStore;
use crate::input::Destination;
use crate::metrics::{ConnectionGuard, Direction, Metrics};
use crate::relay;
use crate::routes::split_host_port;
use crate::server::{HttpProtocol, serve_http};
use crate::tls::{self, ALPN_H2, ALPN_TCP};
use crate::trace::ensure_traceparent;
use crate::upstream::{AppClients, app_clients, connect_app};

/// A peer gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

static X_MANDATE_PEER: HeaderName = HeaderName::from_static("x-mandate-peer");
static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The inbound side of the sidecar.
pub struct Inbound {
    trust_domain: TrustDomain,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    app: Option<(SocketAddr, AppClients)>,
    authz: Option<Arc<Authorizer>>,
    delegation: Arc<Verifier>,
    /// Managed mode: where an agent's sidecar exchanges incoming tokens for its app.
    control_plane: Option<Arc<dyn ControlPlaneCalls>>,
    exchanges: Exchanges,
    cancel: CancellationToken,
}

/// Headers stamped on every request of one connection, computed once at the handshake.
struct PeerStamp {
    id: SpiffeId,
    peer: HeaderValue,
    xfcc: HeaderValue,
    /// `x5t#S256` of the peer's leaf: what tokens it presents must be bound to.
    thumbprint: String,
}

impl Inbound {
    /// Inbound side forwarding to `app` (if any). Delegation tokens peers present are verified
    /// by `delegation`; an agent's sidecar exchanges them for its app at `control_plane`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust_domain: TrustDomain,
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        app: Option<SocketAddr>,
        authz: Option<Arc<Authorizer>>,
        delegation: Arc<Verifier>,
        control_plane: Option<Arc<dyn ControlPlaneCalls>>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            trust_domain,
            identity,
            exchanges: Exchanges::new(metrics.clone()),
            metrics,
            app: app.map(|a| (a, app_clients(a))),
            authz,
            delegation,
            control_plane,
            cancel,
        }
    }

    /// What the peer's call carries: the delegation token (verified with the peer as presenter and
    /// us, or the whole trust domain, as audience), and an approval — one the peer's sidecar
    /// redeemed for this call (with its approver), or one for us to redeem.
    fn credentials(&self, headers: &http::HeaderMap, stamp: &PeerStamp) -> Credentials {
        let ours = self.identity.current();
        let presenter = Presenter {
            id: stamp.id.as_str(),
            thumbprint: &stamp.thumbprint,
        };
        let audiences = [self.delegation.domain(), ours.svid.id.as_str()];
        let delegation = delegation::presented(
            headers,
            &self.delegation,
            Direction::Inbound,
            presenter,
            &audiences,
        );
        let approval = headers.get(&APPROVAL).map(approval_id);
        let approved_by = headers
            .get(&APPROVED_BY)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        let (approval, attested) = match (approval, approved_by) {
            (Some(Ok(id)), Some(by)) => (
                None,
                Some(mandate_wire::ApprovalRecord {
                    id,
                    approved_by: by.to_owned(),
                }),
            ),
            (approval, _) => (approval, None),
        };
        Credentials {
            delegation,
            approval,
            attested,
        }
    }

    /// Handles one accepted connection: handshake, then HTTP or opaque TCP by ALPN.
    pub async fn serve_connection(self: Arc<Self>, tcp: TcpStream, peer_addr: SocketAddr) {
        let _open = ConnectionGuard::new(&self.metrics.inbound.open_connections);
        let identity = self.identity.current();
        let acceptor = TlsAcceptor::from(identity.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = tls::failure_reason(&e);
                self.metrics.handshake_failure(Direction::Inbound, reason);
                tracing::warn!(peer = %peer_addr, reason, error = %e, "inbound TLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, "handshake_timeout");
                tracing::warn!(peer = %peer_addr, reason = "handshake_timeout", "inbound TLS handshake refused");
                return;
            }
        };
        let session = tls.get_ref().1;
        // The verifier accepted this certificate, so it parses as an SVID of our trust domain.
        let Some((leaf, svid)) = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| Some((leaf, check_svid(leaf, &self.trust_domain).ok()?)))
        else {
            tracing::error!(peer = %peer_addr, "verified peer has no SVID; closing");
            return;
        };
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        tracing::debug!(peer = %peer_addr, spiffe_id = %svid.id, "inbound connection");
        // Closed as soon as the registry marks the peer suspended or revoked.
        let tracked = self
            .identity
            .revocations()
            .track(Arc::from(svid.id.as_str()));
        let revoked = tracked.token().clone();
        let peer_id = svid.id.clone();
        let closed = async move {
            revoked.cancelled().await;
            tracing::warn!(peer = %peer_addr, spiffe_id = %peer_id, "closing an inbound connection: the peer is no longer active in the registry");
        };

        if alpn.as_deref() == Some(ALPN_TCP) {
            tokio::select! {
                () = self.relay_tcp(tls, peer_addr, &svid.id) => {}
                () = closed => {}
            }
            return;
        }
        let stamp = Arc::new(PeerStamp {
            id: svid.id.clone(),
            peer: HeaderValue::from_str(svid.id.as_str())
                .expect("SPIFFE IDs are valid header values"),
            xfcc: xfcc(identity.svid.id.as_str(), leaf, svid.id.as_str()),
            thumbprint: mandate_wire::delegation::thumbprint(leaf.as_ref()),
        });
        let protocol = if alpn.as_deref() == Some(ALPN_H2) {
            HttpProtocol::Http2
        } else {
            HttpProtocol::Http1
        };
        let cancel = self.cancel.clone();
        let serve = serve_http(tls, protocol, cancel, move |req| {
            let (this, stamp) = (self.clone(), stamp.clone());
            async move { Ok::<_, Infallible>(this.handle(req, &stamp).await) }
        });
        // Dropping the connection future on revocation closes it at once, in-flight requests too.
        tokio::select! {
            () = serve => {}
            () = closed => {}
        }
    }

    async fn handle(&self, req: Request<Incoming>, stamp: &PeerStamp) -> Response<ProxyBody> {
        let start = Instant::now();
        let resp = self.forward(req, stamp).await;
        self.metrics
            .request(Direction::Inbound, resp.status(), start.elapsed());
        resp
    }

    async fn forward(&self, req: Request<Incoming>, stamp: &PeerStamp) -> Response<ProxyBody> {
        let Some((app_addr, clients)) = &self.app else {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "no_app", "reason": "this sidecar has no --app to forward inbound calls to"}),
            );
        };
        let (mut parts, body) = req.into_parts();
        let credentials = self.credentials(&parts.headers, stamp);
        strip_identity_headers(&mut parts.headers);
        ensure_traceparent(&mut parts.headers);
        // Keep the caller's authority (Host / :authority) so the app sees what was addressed.
        let authority = parts
            .uri
            .authority()
            .cloned()
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            })
            .unwrap_or_else(|| {
                Authority::try_from(app_addr.to_string()).expect("socket address is an authority")
            });
        if let Err(inactive) = self.identity.revocations().check(stamp.id.as_str()) {
            return self.refuse_inactive(&stamp.id, &authority, &parts, inactive.to_string());
        }
        let (body, authorized) = match &self.authz {
            None => {
                if let Presented::Refused(refusal) = &credentials.delegation {
                    let decision = Decision::refusal(refusal.reason.clone());
                    return crate::authz::refused_response("delegation_refused", &decision);
                }
                (Either::Left(body), None)
            }
            Some(authz) => {
                let ours = self.identity.current();
                let (host, port) = split_host_port(authority.as_str(), 80)
                    .unwrap_or_else(|_| (ours.svid.id.name().to_owned(), 80));
                let destination = Destination {
                    host: &host,
                    port,
                    id: Some(&ours.svid.id),
                };
                match authz
                    .authorize_http(
                        Direction::Inbound,
                        &stamp.id,
                        destination,
                        "https",
                        &parts,
                        body,
                        &credentials,
                    )
                    .await
                {
                    Ok((body, authorized)) => (body, Some(authorized)),
                    Err(denied) => return denied,
                }
            }
        };
        if let Some(id) = authorized.as_ref().and_then(AuthorizedHttp::decision_id) {
            parts.headers.insert(DECISION_ID.clone(), id);
        }
        parts
            .headers
            .insert(X_MANDATE_PEER.clone(), stamp.peer.clone());
        parts.headers.insert(XFCC.clone(), stamp.xfcc.clone());
        if let Some(verified) = credentials.verified() {
            // Services never receive the token; an agent gets its own, exchanged, for its onward calls.
            delegation::stamp(&mut parts.headers, verified, false);
            if let Some(cp) = &self.control_plane
                && self.identity.current().svid.id.kind() == mandate_identity::WorkloadKind::Agent
                && let Some(token) = self.exchanges.token_for(verified, cp.as_ref()).await
            {
                parts.headers.insert(DELEGATION.clone(), token);
            }
        }
        let prepared = relay::prepare(Request::from_parts(parts, body), authority);
        let client = clients.for_version(prepared.request.version());
        let mut resp = match relay::send(client, prepared).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(app = %app_addr, error = %e, "app did not answer");
                json_response(
                    StatusCode::BAD_GATEWAY,
                    &json!({"error": "app_unavailable", "reason": format!("the local app at {app_addr} did not answer: {e}")}),
                )
            }
        };
        if let (Some(authz), Some(authorized)) = (&self.authz, authorized) {
            authz.finish(authorized, &mut resp);
        }
        resp
    }

    /// 403 for a call from a peer the registry marks inactive (one whose connection predates the
    /// update and is being closed); recorded when decisions are kept.
    fn refuse_inactive(
        &self,
        peer: &SpiffeId,
        authority: &Authority,
        parts: &Parts,
        reason: String,
    ) -> Response<ProxyBody> {
        tracing::info!(peer = %peer, %reason, "inbound call refused");
        let Some(authz) = &self.authz else {
            return json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "denied", "reason": reason}),
            );
        };
        let ours = self.identity.current();
        let (host, port) = split_host_port(authority.as_str(), 80)
            .unwrap_or_else(|_| (ours.svid.id.name().to_owned(), 80));
        let destination = Destination {
            host: &host,
            port,
            id: Some(&ours.svid.id),
        };
        let decision = authz.refuse(Direction::Inbound, peer, destination, Some(parts), reason);
        crate::authz::denied_response(&decision)
    }

    async fn relay_tcp<S>(&self, mut tls: S, peer_addr: SocketAddr, peer: &SpiffeId)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let Some((app_addr, _)) = &self.app else {
            tracing::warn!(peer = %peer_addr, "opaque TCP refused: no --app configured");
            return;
        };
        if let Some(authz) = &self.authz {
            let ours = self.identity.current();
            // Opaque TCP names no host: the destination is this workload, at the app's port.
            let destination = Destination {
                host: ours.svid.id.name(),
                port: app_addr.port(),
                id: Some(&ours.svid.id),
            };
            if !authz
                .authorize_tcp(Direction::Inbound, peer, destination)
                .proceeds()
            {
                return;
            }
        }
        match connect_app(*app_addr).await {
            Ok(mut app) => {
                if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut app).await {
                    tracing::debug!(peer = %peer_addr, error = %e, "TCP relay ended with an error");
                }
            }
            Err(e) => tracing::warn!(peer = %peer_addr, error = %e, "opaque TCP: app unreachable"),
        }
    }
}

/// Envoy's `x-forwarded-client-cert`: `By=<our id>;Hash=<sha256 of peer cert DER>;URI=<peer id>`.
fn xfcc(ours: &str, peer_leaf: &[u8], peer_id: &str) -> HeaderValue {
    let digest = ring::digest::digest(&ring::digest::SHA256, peer_leaf);
    let mut value = String::with_capacity(ours.len() + peer_id.len() + 80);
    let _ = write!(value, "By={ours};Hash=");
    for byte in digest.as_ref() {
        let _ = write!(value, "{byte:02x}");
    }
    let _ = write!(value, ";URI={peer_id}");
    HeaderValue::from_str(&value).expect("SPIFFE IDs and hex are valid header values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_follows_envoy_format() {
        let v = xfcc("spiffe://td/service/tool", b"cert", "spiffe://td/agent/a");
        assert_eq!(
            v,
            "By=spiffe://td/service/tool;Hash=06298432e8066b29e2223bcc23aa9504b56ae508fabf3435508869b9c3190e22;URI=spiffe://td/agent/a"
        );
    }
}
