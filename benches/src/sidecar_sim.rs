//! Simulated sidecars for the control-plane benchmark: what a managed `mandate-proxy` says to
//! `mandate serve` (enrolment, the push stream, decision batches) and nothing else, so that
//! hundreds of them fit in one lean process — one HTTP/2 connection each, all on the harness's
//! single tokio runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Buf as _, Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mandate_identity::tls::{
    PROVIDER, PemRootsError, SpiffePeer, SpiffeServerVerifier, roots_from_pem,
};
use mandate_identity::{SpiffeId, TrustDomain, csr};
use mandate_wire::{
    CONTROL_PLANE_PATH, DECISIONS_PATH, DecisionBatch, DecisionRecord, DestinationRecord,
    Direction, ENROLL_PATH, EnrollRequest, IngestResult, IssuedIdentity, JoinToken, McpRecord,
    STREAM_PATH,
};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the control plane is and how to recognise it.
#[derive(Clone)]
pub struct Endpoint {
    /// The API listener.
    pub addr: SocketAddr,
    verifier: Arc<SpiffeServerVerifier>,
}

impl Endpoint {
    /// The control plane at `addr`, trusted through the CA certificates in `ca_pem`.
    pub fn new(addr: SocketAddr, ca_pem: &[u8], trust_domain: TrustDomain) -> anyhow::Result<Self> {
        let roots = roots_from_pem(ca_pem).map_err(|e| match e {
            PemRootsError::Pem(e) => anyhow::Error::new(e).context("ca.pem is not PEM"),
            PemRootsError::Unusable(e) => e.into(),
        })?;
        if roots.is_empty() {
            bail!("ca.pem holds no certificate");
        }
        let expected: SpiffeId = format!("{}{CONTROL_PLANE_PATH}", trust_domain.id_uri())
            .parse()
            .context("the trust domain makes no control-plane SPIFFE ID")?;
        // As a real sidecar: only the control plane's SVID, chaining to its CA (the server has no
        // DNS name to check); the chain is judged first.
        let peer = SpiffePeer::new(trust_domain)
            .exactly(expected)
            .chain_first();
        Ok(Self {
            addr,
            verifier: Arc::new(SpiffeServerVerifier::new(peer, Arc::new(roots))),
        })
    }

    fn config(&self, identity: Option<&Identity>) -> anyhow::Result<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(PROVIDER.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier.clone());
        let mut config = match identity {
            Some(id) => builder.with_client_auth_cert(
                id.chain.clone(),
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                    .context("the simulated sidecar's key")?,
            )?,
            None => builder.with_no_client_auth(),
        };
        // The push stream is HTTP/2 by contract; everything else rides the same kind of connection.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// One HTTP/2 connection over TLS 1.3, with `identity` as the client certificate when given.
    pub async fn connect(&self, identity: Option<&Identity>) -> anyhow::Result<Conn> {
        let config = self.config(identity)?;
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS handshake with mandate serve")?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake with mandate serve")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            base: format!("https://{}", self.addr),
        })
    }
}

/// An HTTP/2 connection to the control plane; clones share it.
#[derive(Clone)]
pub struct Conn {
    send: http2::SendRequest<Full<Bytes>>,
    base: String,
}

/// A response read whole.
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON of type `T` when the status is a success, else an error showing both.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        if !self.status.is_success() {
            bail!(
                "answered {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "unexpected body: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(500)])
            )
        })
    }
}

impl Conn {
    fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        Ok(req.body(Full::new(body.unwrap_or_default()))?)
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Answer> {
        let req = self.request(method.clone(), path, bearer, body)?;
        let mut send = self.send.clone();
        send.ready().await.context("connection to mandate serve")?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// Opens the push stream (`GET` [`STREAM_PATH`]) and returns its body once the headers say 200.
    pub async fn open_stream(&self) -> anyhow::Result<hyper::body::Incoming> {
        let req = self.request(Method::GET, STREAM_PATH, None, None)?;
        let mut send = self.send.clone();
        send.ready().await?;
        let resp = send.send_request(req).await.context("opening the stream")?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            bail!(
                "the stream answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(resp.into_body())
    }
}

/// A simulated sidecar's SVID and key.
#[derive(Clone)]
pub struct Identity {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
}

/// Enrols like a sidecar: a fresh key, a CSR for the identity the join token names, the token
/// and CSR to [`ENROLL_PATH`] (no client certificate), and checks the SVID issued is for it.
pub async fn enroll(conn: &Conn, join_token: &str) -> anyhow::Result<Identity> {
    let token = JoinToken::parse(join_token).context("the join token register returned")?;
    let id: SpiffeId = token
        .spiffe_id()
        .parse()
        .map_err(|e| anyhow!("join token identity: {e}"))?;
    let req = csr::request(&id)?;
    let body = serde_json::to_vec(&EnrollRequest {
        join_token: join_token.to_owned(),
        csr: req.csr_pem,
    })?;
    let issued: IssuedIdentity = conn
        .call(Method::POST, ENROLL_PATH, None, Some(body.into()))
        .await?
        .json()
        .context("enrolment")?;
    if issued.spiffe_id != id.as_str() {
        bail!("enrolment issued {} for a token of {id}", issued.spiffe_id);
    }
    let chain = CertificateDer::pem_slice_iter(issued.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the issued certificate is not PEM")?;
    if chain.is_empty() {
        bail!("enrolment returned no certificate");
    }
    Ok(Identity {
        spiffe_id: issued.spiffe_id,
        chain,
        key_pem: req.key_pem,
    })
}

/// Splits a stream body into NDJSON lines, stamping each with when its last byte arrived.
pub struct LineReader {
    body: hyper::body::Incoming,
    buf: BytesMut,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
}

impl LineReader {
    /// Reads lines from a stream body.
    pub fn new(body: hyper::body::Incoming) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            scanned: 0,
        }
    }

    /// The next complete line (without its newline) and its arrival time; `None` when the
    /// stream ended.
    pub async fn next_line(&mut self) -> anyhow::Result<Option<(Bytes, Instant)>> {
        loop {
            // `contains` on bytes is core's word-at-a-time memchr; most chunks hold no newline.
            let fresh = &self.buf[self.scanned..];
            if fresh.contains(&b'\n')
                && let Some(pos) = fresh.iter().position(|&b| b == b'\n')
            {
                let pos = self.scanned + pos;
                let line = self.buf.split_to(pos + 1).freeze();
                self.scanned = 0;
                return Ok(Some((line.slice(..pos), Instant::now())));
            }
            self.scanned = self.buf.len();
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(mut data) = frame?.into_data() {
                        while data.has_remaining() {
                            let n = {
                                let chunk = data.chunk();
                                self.buf.extend_from_slice(chunk);
                                chunk.len()
                            };
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

/// Whether an NDJSON update line's registry shows agent `name` with status `revoked`.
///
/// A full parse of every line on 500 streams would put the harness's own JSON work in the
/// latency it measures, so this finds the agent's key and reads only its entry. The key
/// `"name":` can only occur in `registry.agents` (the harness registers no labels and no service
/// of that name).
pub fn shows_revoked(line: &[u8], name: &str) -> bool {
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    let key = format!("\"{name}\"");
    let mut from = 0;
    while let Some(at) = text[from..].find(&key) {
        let after = from + at + key.len();
        let rest = text[after..].trim_start();
        if let Some(value) = rest.strip_prefix(':') {
            #[derive(serde::Deserialize)]
            struct Entry<'a> {
                #[serde(borrow)]
                status: &'a str,
            }
            let mut de =
                serde_json::Deserializer::from_str(value.trim_start()).into_iter::<Entry>();
            if let Some(Ok(entry)) = de.next() {
                return entry.status == "revoked";
            }
        }
        from = after;
    }
    false
}

/// A realistic decision record of `identity`'s sidecar: an allowed MCP `tools/call` of `search`.
pub fn decision(identity: &str, tool_id: &str, trace: u64) -> DecisionRecord {
    DecisionRecord {
        decision_id: uuid::Uuid::now_v7().to_string(),
        timestamp: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        direction: Direction::Outbound,
        source: identity.to_owned(),
        destination: DestinationRecord {
            host: "tool".to_owned(),
            port: 8080,
            spiffe_id: Some(tool_id.to_owned()),
        },
        method: Some("POST".to_owned()),
        path: Some("/mcp".to_owned()),
        mcp: Some(McpRecord {
            method: Some("tools/call".to_owned()),
            name: Some("search".to_owned()),
        }),
        delegation: None,
        approval: None,
        allow: true,
        enforced: true,
        reason: "allowed: tools/call search is within the agent's ceiling".to_owned(),
        policy_version: Some("1".to_owned()),
        eval_us: 14,
        trace_id: Some(format!("{trace:032x}")),
        sidecar: identity.to_owned(),
        status: Some(200),
    }
}

/// Posts one batch of `n` fresh records and returns what the control plane did with it.
pub async fn post_batch(
    conn: &Conn,
    identity: &str,
    tool_id: &str,
    n: usize,
    trace: &mut u64,
) -> anyhow::Result<IngestResult> {
    let decisions = (0..n)
        .map(|_| {
            *trace += 1;
            decision(identity, tool_id, *trace)
        })
        .collect();
    let body = serde_json::to_vec(&DecisionBatch { decisions })?;
    let answer = conn
        .call(Method::POST, DECISIONS_PATH, None, Some(body.into()))
        .await?;
    answer.json().context("decision batch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_status_of_one_agent_in_a_registry_line() {
        let line = br#"{"type":"update","registry":{"revision":7,"agents":{"a-1":{"spiffe_id":"spiffe://td/agent/a-1","status":"active","owner":"o"},"a-10":{"owner":"o","status":"revoked","spiffe_id":"spiffe://td/agent/a-10"}},"services":{}}}"#;
        assert!(!shows_revoked(line, "a-1"));
        assert!(shows_revoked(line, "a-10"));
        assert!(!shows_revoked(line, "a-2"));
        let spaced = br#"{"registry": {"agents": {"x": {"status": "revoked"}}}}"#;
        assert!(shows_revoked(spaced, "x"));
        assert!(!shows_revoked(br#"{"type":"heartbeat"}"#, "x"));
    }

    #[test]
    fn the_endpoint_accepts_only_the_control_plane_svid_of_its_ca() {
        use mandate_identity::ca::CertificateAuthority;
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls_pki_types::UnixTime;

        let hour = std::time::Duration::from_secs(3600);
        let td: TrustDomain = "bench.local".parse().unwrap();
        let ca = CertificateAuthority::generate(td.clone(), hour).unwrap();
        let addr = "127.0.0.1:1".parse().unwrap();
        let endpoint = Endpoint::new(addr, ca.cert_pem().as_bytes(), td).unwrap();
        let verify = |id: &str| {
            let issued = ca.issue(&id.parse().unwrap(), hour).unwrap();
            let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            endpoint
                .verifier
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
        };
        verify("spiffe://bench.local/control-plane").unwrap();
        assert!(verify("spiffe://bench.local/agent/a").is_err());
        assert!(Endpoint::new(addr, b"", "bench.local".parse().unwrap()).is_err());
    }

    #[test]
    fn decision_records_are_distinct_and_complete() {
        let a = decision("spiffe://td/agent/a", "spiffe://td/service/tool", 1);
        let b = decision("spiffe://td/agent/a", "spiffe://td/service/tool", 2);
        assert_ne!(a.decision_id, b.decision_id);
        assert_eq!(
            uuid::Uuid::parse_str(&a.decision_id)
                .unwrap()
                .get_version_num(),
            7
        );
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["direction"], "outbound");
        assert_eq!(json["trace_id"].as_str().unwrap().len(), 32);
    }
}
