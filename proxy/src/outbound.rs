//! Outbound: the agent's calls. Works as an explicit HTTP proxy (absolute-form and `CONNECT`), by
//! `Host` / `:authority`, and as the target of an iptables REDIRECT (`SO_ORIGINAL_DST`). Routed
//! destinations are reached over mTLS with our SVID; anything else is refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::approval::APPROVED_BY;
use crate::authz::{AuthorizedHttp, Authorizer, Credentials, DECISION_ID, Decision};
use crate::delegation::{self, APPROVAL, Presented, Presenter, Verifier};
use crate::discovery::Routes;
use crate::headers::{ProxyBody, json_response, strip_identity_headers};
use crate::identity::{Identity, IdentityStore};
use crate::input::Destination;
use crate::metrics::{ConnectionGuard, Direction, Metrics};
use crate::relay;
use crate::routes::{Route, RouteProtocol, split_host_port};
use crate::server::{HttpProtocol, serve_http};
use crate::trace::ensure_traceparent;
use crate::upstream::{ConnectError, MeshClients, connect_mesh, find_connect_error, mesh_clients};

/// The outbound side of the sidecar.
pub struct Outbound {
    routes: Arc<Routes>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    mesh: MeshClients,
    authz: Option<Arc<Authorizer>>,
    delegation: Arc<Verifier>,
    cancel: CancellationToken,
}

impl Outbound {
    /// Outbound side for `routes`; delegation tokens the agent presents are verified by
    /// `delegation`.
    pub fn new(
        routes: Arc<Routes>,
        identity: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        authz: Option<Arc<Authorizer>>,
        delegation: Arc<Verifier>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            mesh: mesh_clients(routes.clone(), identity.clone(), metrics.clone()),
            routes,
            identity,
            metrics,
            authz,
            delegation,
            cancel,
        }
    }

    /// What the agent's call carries: its delegation token, verified with us as presenter and the
    /// route's identity (or the whole trust domain) as audience, and the approval it retries with.
    /// Read before the agent's `x-mandate-*` headers are stripped.
    fn credentials(&self, parts: &Parts, route: &Route, own: &Identity) -> Credentials {
        let presenter = Presenter {
            id: own.svid.id.as_str(),
            thumbprint: &own.thumbprint,
        };
        let audiences = [self.delegation.domain(), route.id.as_str()];
        Credentials {
            delegation: delegation::presented(
                &parts.headers,
                &self.delegation,
                Direction::Outbound,
                presenter,
                &audiences,
            ),
            approval: parts
                .headers
                .get(&APPROVAL)
                .map(crate::approval::approval_id),
            // Only a peer sidecar's word counts for that, never the agent's.
            attested: None,
        }
    }

    /// Tracks a connection of our own agent: cancelled when the registry marks our workload
    /// inactive while it is open. One opened afterwards stays, and each call on it is refused
    /// with the reason.
    fn track_own(&self) -> crate::revocation::ConnectionGuard {
        let own = self.identity.current();
        self.identity
            .revocations()
            .track_changes(Arc::from(own.svid.id.as_str()))
    }

    /// Handles one connection to the outbound listener.
    pub async fn serve_connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let _open = ConnectionGuard::new(&self.metrics.outbound.open_connections);
        let own = self.track_own();
        tokio::select! {
            () = self.clone().serve_agent(tcp) => {}
            () = own.token().cancelled() => {
                tracing::warn!(%peer, "closing the agent's connection: our own workload is no longer active in the registry");
            }
        }
    }

    async fn serve_agent(self: Arc<Self>, tcp: TcpStream) {
        let pinned = match redirected_destination(&tcp) {
            None => None,
            Some(dst) => match self.routes.current().find_by_ip(dst) {
                Some(route) if route.protocol == RouteProtocol::Tcp => {
                    let route = route.clone();
                    return self.tunnel(tcp, &route).await;
                }
                Some(route) => Some(route.clone()),
                // Outside the mesh: opaque bytes, decided once by policy on the address.
                None => return self.tunnel_external(tcp, dst).await,
            },
        };
        let cancel = self.cancel.clone();
        serve_http(tcp, HttpProtocol::Detect, cancel, move |req| {
            let (this, pinned) = (self.clone(), pinned.clone());
            async move { Ok::<_, Infallible>(this.handle(req, pinned).await) }
        })
        .await;
    }

    /// Serves a connection accepted on a TCP route's `listen=` address.
    pub async fn serve_route_listener(self: Arc<Self>, tcp: TcpStream, route: Arc<Route>) {
        let _open = ConnectionGuard::new(&self.metrics.outbound.open_connections);
        let own = self.track_own();
        tokio::select! {
            () = self.tunnel(tcp, &route) => {}
            () = own.token().cancelled() => {
                tracing::warn!(route = %route.authority(), "closing a TCP route connection: our own workload is no longer active in the registry");
            }
        }
    }

    /// Tunnels a redirected connection to a destination outside the mesh, if policy allows it
    /// (as opaque TCP to that address: the sidecar cannot see inside, so decides on the address).
    async fn tunnel_external(&self, mut client: TcpStream, dst: SocketAddr) {
        let host = dst.ip().to_string();
        let destination = Destination {
            host: &host,
            port: dst.port(),
            id: None,
        };
        if let Err(refused) = self.tcp_allowed(destination) {
            tracing::warn!(destination = %dst, reason = %refused.reason, "redirected connection to a destination outside the mesh refused");
            return;
        }
        match connect_external(&host, dst.port()).await {
            Ok(mut upstream) => {
                let own = self.track_own();
                splice_until(&mut client, &mut upstream, own.token(), None).await
            }
            Err(e) => {
                tracing::warn!(destination = %dst, error = %e, "external destination unavailable")
            }
        }
    }

    /// `CONNECT` to a destination outside the mesh: a plain TCP tunnel, if policy allows it.
    async fn connect_external(
        &self,
        req: Request<Incoming>,
        host: &str,
        port: u16,
    ) -> Response<ProxyBody> {
        let destination = Destination {
            host,
            port,
            id: None,
        };
        if let Err(denied) = self.tcp_allowed(destination) {
            return crate::authz::denied_response(&denied);
        }
        match connect_external(host, port).await {
            Ok(mut upstream) => {
                let own = self.track_own();
                tokio::spawn(async move {
                    if let Ok(upgraded) = hyper::upgrade::on(req).await {
                        splice_until(
                            &mut TokioIo::new(upgraded),
                            &mut upstream,
                            own.token(),
                            None,
                        )
                        .await
                    }
                });
                Response::new(Either::Right(Full::default()))
            }
            Err(e) => json_response(
                StatusCode::BAD_GATEWAY,
                &json!({"error": "upstream_unavailable", "reason": format!("{host}:{port}: {e}")}),
            ),
        }
    }

    /// Tunnels a plain TCP connection to a TCP route over mTLS, if policy allows.
    async fn tunnel(&self, mut client: TcpStream, route: &Route) {
        if self.tcp_allowed(route.destination()).is_err() {
            return; // the refusal is logged and recorded; closing is all TCP can say
        }
        let config = self.identity.current().client_tcp.clone();
        match connect_mesh(route, config, &self.metrics).await {
            Ok(mut upstream) => {
                let own = self.track_own();
                let peer = self
                    .identity
                    .revocations()
                    .track(Arc::from(route.id.as_str()));
                splice_until(&mut client, &mut upstream, own.token(), Some(peer.token())).await
            }
            Err(e) => {
                tracing::warn!(route = %route.authority(), error = %e, "TCP route unavailable; closing the client connection")
            }
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        pinned: Option<Arc<Route>>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let resp = self.route_request(req, pinned).await;
        self.metrics
            .request(Direction::Outbound, resp.status(), start.elapsed());
        resp
    }

    async fn route_request(
        &self,
        req: Request<Incoming>,
        pinned: Option<Arc<Route>>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        // Before anything is decided, so every record of this call — refusals included — has a trace id.
        ensure_traceparent(&mut parts.headers);
        let route = match pinned {
            Some(route) => route,
            None => {
                let (host, port) = match destination(&parts) {
                    Ok(dest) => dest,
                    Err(why) => {
                        return json_response(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": "bad_request", "reason": why}),
                        );
                    }
                };
                match self.routes.current().find(&host, port) {
                    Some(route) => route.clone(),
                    None if parts.method == Method::CONNECT => {
                        return self
                            .connect_external(Request::from_parts(parts, body), &host, port)
                            .await;
                    }
                    None => return self.refuse_unrouted(&parts, &host, port),
                }
            }
        };
        if parts.method == Method::CONNECT {
            return self.connect(Request::from_parts(parts, body), &route).await;
        }
        if let Some(reason) = self.inactive(route.destination()) {
            return crate::authz::denied_response(&self.refuse_inactive(
                Some(&parts),
                route.destination(),
                reason,
            ));
        }
        if route.protocol == RouteProtocol::Tcp {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "bad_request", "reason": format!(
                    "{} is an opaque TCP route: use CONNECT or its listen address, not plain HTTP", route.authority()
                )}),
            );
        }

        let identity = self.identity.current();
        let credentials = self.credentials(&parts, &route, &identity);
        strip_identity_headers(&mut parts.headers);
        let (body, authorized) = match &self.authz {
            None => {
                if let Presented::Refused(refusal) = &credentials.delegation {
                    let decision = Decision::refusal(refusal.reason.clone());
                    return crate::authz::refused_response("delegation_refused", &decision);
                }
                (Either::Left(body), None)
            }
            Some(authz) => {
                let scheme = if parts.uri.scheme() == Some(&Scheme::HTTPS) {
                    "https"
                } else {
                    "http"
                };
                match authz
                    .authorize_http(
                        Direction::Outbound,
                        &identity.svid.id,
                        route.destination(),
                        scheme,
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
        stamp_onward(
            &mut parts.headers,
            &credentials,
            authorized.as_ref(),
            route.destination().id.is_some(),
        );
        let prepared = relay::prepare(Request::from_parts(parts, body), route.authority.clone());
        let client = self.mesh.for_version(prepared.request.version());
        let mut resp = match relay::send(client, prepared).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(route = %route.authority(), error = %e, "upstream failed");
                match find_connect_error(&e) {
                    Some(ce) => connect_error_response(ce),
                    None => json_response(
                        StatusCode::BAD_GATEWAY,
                        &json!({"error": "upstream_unavailable", "reason": format!("{e}: {}", error_chain(&e))}),
                    ),
                }
            }
        };
        if let (Some(authz), Some(authorized)) = (&self.authz, authorized) {
            authz.finish(authorized, &mut resp);
        }
        resp
    }

    /// 403 for a destination with no route; recorded as a decision when decisions are kept.
    fn refuse_unrouted(&self, parts: &Parts, host: &str, port: u16) -> Response<ProxyBody> {
        let dest = format!("{host}:{port}");
        let reason = format!(
            "no route to {dest}: plain HTTP to a destination outside the mesh is refused; \
             call it over https (through HTTPS_PROXY, a CONNECT tunnel that policy decides on)"
        );
        tracing::info!(destination = %dest, "refused: no route");
        let mut body = json!({"error": "denied", "reason": reason, "destination": dest});
        let Some(authz) = &self.authz else {
            return json_response(StatusCode::FORBIDDEN, &body);
        };
        let identity = self.identity.current();
        let destination = Destination {
            host,
            port,
            id: None,
        };
        let decision = authz.refuse(
            Direction::Outbound,
            &identity.svid.id,
            destination,
            Some(parts),
            reason,
        );
        body["decision_id"] = json!(decision.id.to_string());
        let mut resp = json_response(StatusCode::FORBIDDEN, &body);
        resp.headers_mut()
            .insert(DECISION_ID.clone(), decision.header_value());
        resp
    }

    /// Why the registry forbids this call before policy is asked: our own workload, or the
    /// meshed destination, is suspended or revoked.
    fn inactive(&self, destination: Destination<'_>) -> Option<String> {
        let revocations = self.identity.revocations();
        let own = self.identity.current();
        revocations
            .check(own.svid.id.as_str())
            .and_then(|()| {
                destination
                    .id
                    .map_or(Ok(()), |id| revocations.check(id.as_str()))
            })
            .err()
            .map(|inactive| inactive.to_string())
    }

    /// Refuses (and records, when decisions are kept) a call the registry forbids.
    fn refuse_inactive(
        &self,
        parts: Option<&Parts>,
        destination: Destination<'_>,
        reason: String,
    ) -> Decision {
        tracing::info!(destination = %destination.host, port = destination.port, %reason, "outbound call refused");
        match &self.authz {
            Some(authz) => {
                let own = self.identity.current();
                authz.refuse(
                    Direction::Outbound,
                    &own.svid.id,
                    destination,
                    parts,
                    reason,
                )
            }
            None => Decision::refusal(reason),
        }
    }

    /// Whether the registry and policy let this sidecar open a TCP stream to `destination`.
    /// Without a policy the registry alone decides for meshed destinations, and nothing outside
    /// the mesh is reached.
    fn tcp_allowed(&self, destination: Destination<'_>) -> Result<(), Box<Decision>> {
        if let Some(reason) = self.inactive(destination) {
            return Err(Box::new(self.refuse_inactive(None, destination, reason)));
        }
        let Some(authz) = &self.authz else {
            return match destination.id {
                Some(_) => Ok(()),
                None => Err(Box::new(Decision::refusal(format!(
                    "no route to {}:{}, and without a policy destinations outside the mesh are refused",
                    destination.host, destination.port
                )))),
            };
        };
        let identity = self.identity.current();
        let decision = authz.authorize_tcp(Direction::Outbound, &identity.svid.id, destination);
        if decision.proceeds() {
            Ok(())
        } else {
            Err(Box::new(decision))
        }
    }

    /// `CONNECT`: decide, establish the mTLS stream so failures get a real status, then splice.
    async fn connect(&self, req: Request<Incoming>, route: &Route) -> Response<ProxyBody> {
        if let Err(denied) = self.tcp_allowed(route.destination()) {
            return crate::authz::denied_response(&denied);
        }
        let config = self.identity.current().client_tcp.clone();
        match connect_mesh(route, config, &self.metrics).await {
            Ok(mut upstream) => {
                // The tunnel outlives this request's connection task: it watches both ends itself.
                let own = self.track_own();
                let peer = self
                    .identity
                    .revocations()
                    .track(Arc::from(route.id.as_str()));
                tokio::spawn(async move {
                    match hyper::upgrade::on(req).await {
                        Ok(upgraded) => {
                            let (own, peer) = (own.token(), Some(peer.token()));
                            splice_until(&mut TokioIo::new(upgraded), &mut upstream, own, peer)
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "CONNECT client went away before the tunnel opened")
                        }
                    }
                });
                // A 2xx answer to CONNECT has no body.
                Response::new(Either::Right(Full::default()))
            }
            Err(e) => {
                tracing::warn!(route = %route.authority(), error = %e, "CONNECT upstream failed");
                connect_error_response(&e)
            }
        }
    }
}

/// Stamps what the call goes ahead with: the verified delegation (the token itself only to a
/// meshed destination, whose sidecar verifies it again), and for a meshed destination the approval
/// — redeemed here (with its approver, so the destination's sidecar need not ask again), or, when
/// our policy needed none, the agent's `x-mandate-approval` for the destination's sidecar to redeem.
fn stamp_onward(
    headers: &mut http::HeaderMap,
    credentials: &Credentials,
    authorized: Option<&AuthorizedHttp>,
    meshed: bool,
) {
    if let Some(verified) = credentials.verified() {
        delegation::stamp(headers, verified, meshed);
    }
    if !meshed {
        return;
    }
    match authorized.and_then(AuthorizedHttp::approval) {
        Some(approval) => {
            if let (Ok(id), Ok(by)) = (
                http::HeaderValue::from_str(&approval.id),
                http::HeaderValue::from_str(&approval.approved_by),
            ) {
                headers.insert(APPROVAL.clone(), id);
                headers.insert(APPROVED_BY.clone(), by);
            }
        }
        None => {
            if let Some(Ok(id)) = &credentials.approval
                && let Ok(id) = http::HeaderValue::from_str(id)
            {
                headers.insert(APPROVAL.clone(), id);
            }
        }
    }
}

/// Copies both ways until either side closes, or until our workload, or the meshed peer's (none
/// outside the mesh), becomes inactive.
async fn splice_until<A, B>(
    a: &mut A,
    b: &mut B,
    own: &CancellationToken,
    peer: Option<&CancellationToken>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional(a, b) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        () = own.cancelled() => {
            tracing::warn!("closing a tunnel: our own workload is no longer active in the registry");
        }
        () = async { match peer { Some(p) => p.cancelled().await, None => std::future::pending().await } } => {
            tracing::warn!("closing a tunnel: a workload at one end is no longer active in the registry");
        }
    }
}

/// The JSON answer for a peer that could not be reached or was not who the route says.
fn connect_error_response(e: &ConnectError) -> Response<ProxyBody> {
    let body = match e {
        ConnectError::IdentityMismatch {
            expected,
            presented,
            ..
        } => json!({
            "error": "peer_identity_mismatch",
            "reason": e.to_string(),
            "expected": expected,
            "presented": presented,
        }),
        _ => json!({"error": "upstream_unavailable", "reason": e.to_string()}),
    };
    json_response(StatusCode::BAD_GATEWAY, &body)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut current = e.source();
    while let Some(s) = current {
        parts.push(s.to_string());
        current = s.source();
    }
    parts.join(": ")
}

/// Where an explicitly addressed request goes: the URI authority (absolute-form, CONNECT, HTTP/2),
/// else the `Host` header.
fn destination(parts: &Parts) -> Result<(String, u16), String> {
    let default_port = if parts.uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or("request names no destination: send absolute-form (via HTTP_PROXY), CONNECT, or a Host header")?,
    };
    split_host_port(authority, default_port)
        .map_err(|why| format!("bad destination {authority:?}: {why}"))
}

/// Opens plain TCP to a destination outside the mesh (resolving its name), within the connect
/// timeout.
async fn connect_external(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let connect = TcpStream::connect((host, port));
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The original destination of a connection an iptables REDIRECT sent here, if it was redirected.
fn redirected_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    // No conntrack entry (ENOENT) or one that points at us: the agent addressed the listener itself.
    original
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|dst| *dst != local)
}
