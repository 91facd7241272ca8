//! An in-process stand-in for `mandate serve`, built from the wire types: enrolment by join token,
//! renewal, the NDJSON push stream and decision ingest, delegation tokens (issue and exchange) and
//! approvals (ask, approve, redeem), over TLS 1.3 with its CA in the chain as the real one presents
//! it. Enough of the contract to test the sidecar's side of it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mandate_identity::ca::CertificateAuthority;
use mandate_identity::csr::requested_id;
use mandate_identity::svid::check_svid;
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_proxy::config::{Args, Config};
use mandate_wire::delegation::{Actor, Confirmation, DelegationClaims, SigningKey, thumbprint};
use mandate_wire::{
    APPROVALS_PATH, ApiError, ApprovalRequest, ApprovalTicket, DECISIONS_PATH,
    DELEGATION_EXCHANGE_PATH, DELEGATION_TOKEN_PATH, DecisionBatch, DecisionRecord,
    DelegationState, ENROLL_PATH, EnrollRequest, ExchangeRequest, IngestResult, IssuedIdentity,
    IssuedToken, JoinToken, RENEW_PATH, RedeemRequest, Redeemed, Registry, RegistryEntry,
    RenewRequest, RevokedGrant, STREAM_PATH, SignedBundle, StreamMessage, TokenRequest,
    WorkloadStatus,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

pub const TD: &str = "mandate.local";

type Resp = Response<BoxBody<Bytes, Infallible>>;

/// What the fake has seen and will do.
pub struct State {
    pub ca: CertificateAuthority,
    /// Join token secret hash → (SPIFFE ID, used).
    tokens: Mutex<HashMap<String, (String, bool)>>,
    /// Every request, as "METHOD path" (query included).
    pub requests: Mutex<Vec<String>>,
    streams: Mutex<Vec<mpsc::Sender<Bytes>>>,
    /// Every line pushed so far; a new stream receives them all first.
    history: Mutex<Vec<Bytes>>,
    pub decisions: Mutex<Vec<DecisionRecord>>,
    pub decision_posts: AtomicUsize,
    /// Decision POSTs still to answer 503.
    pub fail_decisions: AtomicUsize,
    pub svid_ttl: Duration,
    /// Signs delegation tokens.
    pub signing: SigningKey,
    /// Grant id → (agent SPIFFE ID, subject).
    pub grants: Mutex<HashMap<String, (String, String)>>,
    /// Tokens issued, with their claims (the exchange looks the subject token up here).
    issued: Mutex<HashMap<String, DelegationClaims>>,
    /// Approval id → the approval.
    pub approvals: Mutex<HashMap<String, FakeApproval>>,
}

/// An approval asked for.
#[derive(Debug, Clone)]
pub struct FakeApproval {
    pub request: ApprovalRequest,
    /// Who asked (the sidecar's SPIFFE ID).
    pub agent: String,
    /// Who approved, once approved.
    pub approved_by: Option<String>,
    pub used: bool,
}

/// A running fake control plane.
pub struct FakeControlPlane {
    pub addr: SocketAddr,
    pub state: Arc<State>,
}

pub fn td() -> TrustDomain {
    TD.parse().unwrap()
}

pub fn ca_der(ca: &CertificateAuthority) -> Vec<u8> {
    CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
        .unwrap()
        .to_vec()
}

impl FakeControlPlane {
    /// Starts serving on a free port.
    pub async fn start() -> Self {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        Self::start_with(ca, Duration::from_secs(3600)).await
    }

    /// Starts serving with `ca`, issuing SVIDs valid for `svid_ttl`.
    pub async fn start_with(ca: CertificateAuthority, svid_ttl: Duration) -> Self {
        let id: SpiffeId = format!("spiffe://{TD}/control-plane").parse().unwrap();
        let own = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let chain = vec![
            CertificateDer::from_pem_slice(own.cert_pem.as_bytes()).unwrap(),
            CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap(),
        ];
        let key = PrivateKeyDer::from_pem_slice(own.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(chain[1].clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .unwrap();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            ca,
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            history: Mutex::new(Vec::new()),
            decisions: Mutex::new(Vec::new()),
            decision_posts: AtomicUsize::new(0),
            fail_decisions: AtomicUsize::new(0),
            svid_ttl,
            signing: SigningKey::generate("fake-key".into()).0,
            grants: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
            approvals: Mutex::new(HashMap::new()),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| {
                            let svid = check_svid(leaf, &td()).ok()?;
                            Some(Peer {
                                id: svid.id,
                                thumbprint: thumbprint(leaf.as_ref()),
                            })
                        });
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, peer) = (state.clone(), peer.clone());
                        async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Registers `id` and returns its one-time join token.
    pub fn token(&self, id: &str) -> JoinToken {
        let token = JoinToken::generate(id, &ca_der(&self.state.ca));
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.secret_hash(), (id.to_owned(), false));
        token
    }

    /// How many requests went to `path`.
    pub fn count(&self, path: &str) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains(path))
            .count()
    }

    /// Open push streams.
    pub fn streams(&self) -> usize {
        let mut streams = self.state.streams.lock().unwrap();
        streams.retain(|s| !s.is_closed());
        streams.len()
    }

    /// Pushes one update line to every stream (and to streams opened later).
    pub fn push(&self, message: &StreamMessage) {
        let mut line = serde_json::to_vec(message).unwrap();
        line.push(b'\n');
        let line = Bytes::from(line);
        self.state.history.lock().unwrap().push(line.clone());
        for stream in self.state.streams.lock().unwrap().iter() {
            let _ = stream.try_send(line.clone());
        }
    }

    /// A bundle signed by this control plane's CA.
    pub fn bundle(&self, version: u64, rego: &str, data: &str) -> SignedBundle {
        sign_bundle(&self.state.ca, version, rego, data)
    }

    /// Decision records received.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.state.decisions.lock().unwrap().clone()
    }

    /// Creates a grant for `agent` on behalf of `subject`.
    pub fn grant(&self, id: &str, agent: &str, subject: &str) {
        self.state
            .grants
            .lock()
            .unwrap()
            .insert(id.to_owned(), (agent.to_owned(), subject.to_owned()));
    }

    /// The delegation state at `revision`: this control plane's key, and `revoked` grants.
    pub fn delegation_state(&self, revision: u64, revoked: &[&str]) -> DelegationState {
        DelegationState {
            revision,
            keys: vec![self.state.signing.public_jwk()],
            revoked_grants: revoked
                .iter()
                .map(|id| RevokedGrant {
                    id: (*id).to_owned(),
                    expires_at: unix_now() + 3600,
                })
                .collect(),
        }
    }

    /// A person approves approval `id`.
    pub fn approve(&self, id: &str, by: &str) {
        self.state
            .approvals
            .lock()
            .unwrap()
            .get_mut(id)
            .expect("a known approval")
            .approved_by = Some(by.to_owned());
    }
}

/// The authenticated client of a connection.
#[derive(Clone)]
struct Peer {
    id: SpiffeId,
    thumbprint: String,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A bundle with one module `authz.rego`, signed by `ca`.
pub fn sign_bundle(
    ca: &CertificateAuthority,
    version: u64,
    rego: &str,
    data: &str,
) -> SignedBundle {
    let modules = BTreeMap::from([("authz.rego".to_owned(), rego.to_owned())]);
    SignedBundle::sign(version, modules, data.to_owned(), |i| ca.sign_bytes(i)).unwrap()
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    resp
}

fn error(status: StatusCode, error: &str) -> Resp {
    json(
        status,
        &ApiError {
            error: error.to_owned(),
            field: None,
            messages: vec![],
        },
    )
}

async fn body_of<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, &e.to_string()))
}

async fn handle(state: &State, peer: Option<Peer>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let line = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    );
    state.requests.lock().unwrap().push(line);
    match (req.method().clone(), path.as_str()) {
        (Method::POST, ENROLL_PATH) => {
            let enrol: EnrollRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let Ok(token) = JoinToken::parse(&enrol.join_token) else {
                return error(StatusCode::BAD_REQUEST, "join_token malformed");
            };
            let id = {
                let mut tokens = state.tokens.lock().unwrap();
                match tokens.get_mut(&token.secret_hash()) {
                    None => return error(StatusCode::UNAUTHORIZED, "join token is not known"),
                    Some((_, true)) => {
                        return error(
                            StatusCode::UNAUTHORIZED,
                            "join token has already been used; issue a fresh one with `mandate agent token NAME`",
                        );
                    }
                    Some((id, used)) => {
                        *used = true;
                        id.clone()
                    }
                }
            };
            issue(state, &id, &enrol.csr)
        }
        (Method::POST, RENEW_PATH) => {
            let Some(peer) = peer else {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            };
            let renew: RenewRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            issue(state, peer.id.as_str(), &renew.csr)
        }
        (Method::GET, STREAM_PATH) => {
            if peer.is_none() {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            }
            let (tx, rx) = mpsc::channel(64);
            for line in state.history.lock().unwrap().iter() {
                let _ = tx.try_send(line.clone());
            }
            state.streams.lock().unwrap().push(tx);
            let mut resp = Response::new(ChannelBody(rx).boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                mandate_wire::NDJSON.parse().unwrap(),
            );
            resp
        }
        (Method::POST, DECISIONS_PATH) => {
            if peer.is_none() {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            }
            state.decision_posts.fetch_add(1, Ordering::SeqCst);
            let batch: DecisionBatch = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            if state
                .fail_decisions
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
            }
            let mut stored = state.decisions.lock().unwrap();
            let mut result = IngestResult {
                accepted: 0,
                duplicates: 0,
            };
            for record in batch.decisions {
                if stored.iter().any(|r| r.decision_id == record.decision_id) {
                    result.duplicates += 1;
                } else {
                    result.accepted += 1;
                    stored.push(record);
                }
            }
            json(StatusCode::OK, &result)
        }
        (Method::POST, DELEGATION_TOKEN_PATH) => {
            let Some(peer) = peer else {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            };
            let asked: TokenRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let Some((agent, subject)) = state.grants.lock().unwrap().get(&asked.grant_id).cloned()
            else {
                return error(StatusCode::NOT_FOUND, "no such grant");
            };
            if agent != peer.id.as_str() {
                return error(StatusCode::FORBIDDEN, "the grant is another agent's");
            }
            let now = unix_now();
            let claims = DelegationClaims {
                iss: format!("spiffe://{TD}/control-plane"),
                sub: subject,
                act: Actor::from_chain(&[agent]),
                scope: vec![serde_json::json!({"host": "*"})],
                constraints: None,
                grant_id: asked.grant_id,
                aud: if asked.audience.is_empty() {
                    vec![format!("spiffe://{TD}")]
                } else {
                    asked.audience
                },
                iat: now,
                nbf: now,
                exp: now + 300,
                jti: uuid::Uuid::now_v7().to_string(),
                cnf: Confirmation {
                    x5t_s256: peer.thumbprint,
                },
                approved_by: "the grantor".into(),
                purpose: "testing".into(),
            };
            sign_token(state, claims)
        }
        (Method::POST, DELEGATION_EXCHANGE_PATH) => {
            let Some(peer) = peer else {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            };
            let asked: ExchangeRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let Some(mut claims) = state
                .issued
                .lock()
                .unwrap()
                .get(&asked.subject_token)
                .cloned()
            else {
                return error(StatusCode::BAD_REQUEST, "subject_token is not one of ours");
            };
            let mut chain = claims.act.chain();
            if chain.iter().any(|a| a == peer.id.as_str()) {
                return error(StatusCode::FORBIDDEN, "the caller is already in the chain");
            }
            chain.push(peer.id.to_string());
            claims.act = Actor::from_chain(&chain);
            claims.cnf = Confirmation {
                x5t_s256: peer.thumbprint,
            };
            claims.jti = uuid::Uuid::now_v7().to_string();
            sign_token(state, claims)
        }
        (Method::POST, APPROVALS_PATH) => {
            let Some(peer) = peer else {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            };
            let request: ApprovalRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let id = uuid::Uuid::now_v7().to_string();
            state.approvals.lock().unwrap().insert(
                id.clone(),
                FakeApproval {
                    request,
                    agent: peer.id.to_string(),
                    approved_by: None,
                    used: false,
                },
            );
            json(
                StatusCode::CREATED,
                &ApprovalTicket {
                    id,
                    expires_at: unix_now() + 600,
                },
            )
        }
        (Method::POST, p) if p.starts_with(APPROVALS_PATH) && p.ends_with("/redeem") => {
            let Some(peer) = peer else {
                return error(StatusCode::UNAUTHORIZED, "a client certificate is required");
            };
            let id = p[APPROVALS_PATH.len() + 1..p.len() - "/redeem".len()].to_owned();
            let redeem: RedeemRequest = match body_of(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let mut approvals = state.approvals.lock().unwrap();
            let Some(approval) = approvals.get_mut(&id) else {
                return error(StatusCode::NOT_FOUND, "no such approval");
            };
            let refusal = if approval.agent != peer.id.as_str() {
                Some("asked for by another workload")
            } else if approval.used {
                Some("already used")
            } else if approval.approved_by.is_none() {
                Some("pending")
            } else if approval.request.fingerprint != redeem.fingerprint {
                Some("does not match this call")
            } else {
                None
            };
            if let Some(why) = refusal {
                return error(StatusCode::CONFLICT, why);
            }
            approval.used = true;
            json(
                StatusCode::OK,
                &Redeemed {
                    approved_by: approval.approved_by.clone().unwrap_or_default(),
                    approved_at: unix_now(),
                },
            )
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn sign_token(state: &State, claims: DelegationClaims) -> Resp {
    let token = state.signing.sign(&claims);
    let expires_at = claims.exp;
    state.issued.lock().unwrap().insert(token.clone(), claims);
    json(StatusCode::OK, &IssuedToken { token, expires_at })
}

fn issue(state: &State, id: &str, csr: &str) -> Resp {
    match requested_id(csr) {
        Ok(asked) if asked == id => {}
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "csr must ask for the registered identity",
            );
        }
    }
    let spiffe_id: SpiffeId = id.parse().unwrap();
    let certificate = state
        .ca
        .issue_for_csr(csr, &spiffe_id, state.svid_ttl)
        .unwrap();
    json(
        StatusCode::OK,
        &IssuedIdentity {
            spiffe_id: id.to_owned(),
            certificate,
            trust_bundle: state.ca.cert_pem().to_owned(),
            expires_at: 0,
        },
    )
}

/// A response body fed line by line through a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

// ---- What the tests around it share ----

/// Polls `check` every 50 ms until it holds; panics after 10 s naming `what`.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A registry of the given `(kind, name, status)` workloads in the test trust domain, revision 1.
pub fn registry(statuses: &[(&str, &str, WorkloadStatus)]) -> Registry {
    let mut registry = Registry {
        revision: 1,
        ..Default::default()
    };
    for (kind, name, status) in statuses {
        let entry = RegistryEntry {
            spiffe_id: format!("spiffe://{TD}/{kind}/{name}"),
            status: *status,
            owner: "alice".into(),
            description: String::new(),
            ceiling: vec![],
            autonomous: vec![],
            labels: BTreeMap::new(),
            reach: Default::default(),
        };
        let map = if *kind == "agent" {
            &mut registry.agents
        } else {
            &mut registry.services
        };
        map.insert((*name).to_owned(), entry);
    }
    registry
}

/// A managed sidecar's listeners.
pub struct Sidecar {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts a managed sidecar for `id` (joined to `cp` with a fresh token) in process, listening on
/// free ports, with `extra` arguments; it panics if it ever fails.
pub fn spawn_sidecar(cp: &FakeControlPlane, id: &str, extra: &[String]) -> Sidecar {
    let token = cp.token(id).expose();
    let s = Sidecar {
        outbound: mandate_e2e::ports::free_addr(),
        inbound: mandate_e2e::ports::free_addr(),
        admin: mandate_e2e::ports::free_addr(),
    };
    let mut argv: Vec<String> = [
        "mandate-proxy",
        "--control-plane",
        &cp.url(),
        "--join-token",
        &token,
        "--outbound",
        &s.outbound.to_string(),
        "--inbound",
        &s.inbound.to_string(),
        "--admin",
        &s.admin.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    argv.extend_from_slice(extra);
    let config = Config::from_args(Args::parse_from(argv)).unwrap();
    tokio::spawn(async move {
        if let Err(e) = mandate_proxy::run(config).await {
            panic!("sidecar failed: {e:#}");
        }
    });
    s
}
