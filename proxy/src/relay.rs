//! Forwarding one HTTP request through a pooled client: header hygiene, URI rewrite, and splicing
//! the two halves of a protocol upgrade (WebSocket) once the upstream agrees to it.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;

use crate::headers::{ProxyBody, is_upgrade, strip_hop_by_hop};

/// A request cleaned for the next hop, with the caller's half of an upgrade if it asked for one.
pub struct Prepared {
    /// The request to send upstream.
    pub request: Request<ProxyBody>,
    downstream_upgrade: Option<OnUpgrade>,
}

/// Strips hop-by-hop headers and points the URI at `authority` (which selects the upstream
/// pool); the path and query are kept. Callers strip caller-supplied identity headers earlier,
/// before policy sees the request.
pub fn prepare(mut req: Request<ProxyBody>, authority: Authority) -> Prepared {
    let upgrade = is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a valid URI");
    Prepared {
        request: req,
        downstream_upgrade,
    }
}

/// Sends a prepared request and relays the response; a `101` splices both upgraded streams.
pub async fn send<C>(
    client: &Client<C, ProxyBody>,
    prepared: Prepared,
) -> Result<Response<ProxyBody>, hyper_util::client::legacy::Error>
where
    C: tower_service::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send,
    C::Future: Send + Unpin,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let version = prepared.request.version();
    let mut resp = client.request(prepared.request).await?;
    // The caller speaks the version it sent, whatever the upstream answered with (e.g. HTTP/1.0).
    *resp.version_mut() = version;
    match (resp.status(), prepared.downstream_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(downstream)) => {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(downstream, upstream));
        }
        _ => strip_hop_by_hop(resp.headers_mut(), false),
    }
    Ok(resp.map(Either::Left))
}

async fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    match tokio::try_join!(downstream, upstream) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!(error = %e, "upgraded stream ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade did not complete"),
    }
}
