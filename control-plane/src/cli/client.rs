//! The admin API client: one HTTPS connection per request to the control plane, trusting only
//! the operator's CA and only the `spiffe://<td>/control-plane` identity, with the admin token
//! as a bearer credential.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mandate_wire::ApiError;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::table::{clean, clean_lines};
use super::tls::{self, CaBundle};

/// The control plane's API address when `--server` and `MANDATE_SERVER` are not given.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:15012";
/// Environment variable holding the admin token itself (there is no flag: argv is visible to every user).
pub const ADMIN_TOKEN_ENV: &str = "MANDATE_ADMIN_TOKEN";

/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request may take (a policy push compiles and tests the bundle server-side).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest response body read (an audit query of many full records).
const MAX_RESPONSE: usize = 64 << 20;

/// Characters escaped in one path segment: everything but unreserved characters.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']')
    .add(b'+')
    .add(b'&')
    .add(b'=')
    .add(b';')
    .add(b':')
    .add(b'@')
    .add(b',')
    .add(b'$')
    .add(b'\'')
    .add(b'!')
    .add(b'*')
    .add(b'(')
    .add(b')');

/// The help section the server options are listed under.
const HEADING: &str = "Control plane";

/// Where the control plane is and how to authenticate to it (every API command takes these).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Control plane API URL.
    #[arg(
        long,
        value_name = "URL",
        env = "MANDATE_SERVER",
        default_value = DEFAULT_SERVER,
        global = true,
        help_heading = HEADING
    )]
    pub server: String,
    /// The control plane's CA certificate, e.g. <data-dir>/ca.pem (required for https).
    #[arg(
        long,
        value_name = "FILE",
        env = "MANDATE_CACERT",
        global = true,
        help_heading = HEADING
    )]
    pub ca_cert: Option<PathBuf>,
    /// File holding the admin token [default: the MANDATE_ADMIN_TOKEN variable].
    #[arg(
        long,
        value_name = "FILE",
        env = "MANDATE_ADMIN_TOKEN_FILE",
        global = true,
        help_heading = HEADING
    )]
    pub admin_token_file: Option<PathBuf>,
}

/// Why an API call did not produce the expected answer; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--server` is not a usable URL.
    #[error("invalid --server URL {url:?}: {why} (expected e.g. {DEFAULT_SERVER})")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// An https URL without a CA certificate to trust.
    #[error(
        "{url} is https: pass --ca-cert FILE (or set MANDATE_CACERT) pointing at the control plane's <data-dir>/ca.pem"
    )]
    NoCaCert {
        /// The server URL.
        url: String,
    },
    /// The CA certificate file is unreadable or unusable.
    #[error("--ca-cert: {0}")]
    BadCa(String),
    /// The client certificate or key (`--cert`, `--key`) is unreadable or unusable.
    #[error("{0}")]
    Identity(String),
    /// No admin token anywhere.
    #[error(
        "no admin token: set {ADMIN_TOKEN_ENV} or pass --admin-token-file FILE (`mandate serve` writes one to <data-dir>/admin-token)"
    )]
    NoToken,
    /// The admin token file is unreadable, empty or holds what cannot be sent.
    #[error("--admin-token-file {}: {why}", path.display())]
    BadTokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `MANDATE_ADMIN_TOKEN` holds what cannot be sent in a header.
    #[error("{ADMIN_TOKEN_ENV}: {0}")]
    BadTokenEnv(String),
    /// TCP connect failed.
    #[error(
        "cannot connect to the control plane at {url}: {why}; check that `mandate serve` runs there and that --server (MANDATE_SERVER) is right"
    )]
    Connect {
        /// The server URL.
        url: String,
        /// The OS error or timeout.
        why: String,
    },
    /// The TLS handshake failed (wrong CA, not the control plane, …).
    #[error("TLS to the control plane at {url} failed: {why}")]
    Tls {
        /// The server URL.
        url: String,
        /// What was refused, in the operator's terms.
        why: String,
    },
    /// The HTTP exchange broke off.
    #[error("{method} {url} failed: {why}")]
    Http {
        /// Request method.
        method: Method,
        /// The full request URL.
        url: String,
        /// What happened.
        why: String,
    },
    /// A success status with a body that is not what the API promises.
    #[error("{method} {url}: unexpected answer from the server: {why}")]
    BadResponse {
        /// Request method.
        method: Method,
        /// The full request URL.
        url: String,
        /// What did not parse.
        why: String,
    },
    /// The server refused the request with an [`ApiError`].
    #[error("{}", render_api_error(*status, error))]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The server's explanation.
        error: ApiError,
    },
    /// The server refused the request without an [`ApiError`] body.
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        /// Request method.
        method: Method,
        /// The full request URL.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body, cleaned for the terminal.
        body: String,
    },
}

/// The server's error as the operator reads it: the error, the field, then one message per line.
pub fn render_api_error(status: StatusCode, e: &ApiError) -> String {
    let mut out = format!("{} (HTTP {})", clean(&e.error), status.as_u16());
    if let Some(field) = &e.field {
        out.push_str(&format!("\n  field: {}", clean(field)));
    }
    for m in &e.messages {
        out.push_str("\n  ");
        out.push_str(&clean_lines(m, "    "));
    }
    if status == StatusCode::UNAUTHORIZED {
        out.push_str(&format!(
            "\n  check the admin token ({ADMIN_TOKEN_ENV} or --admin-token-file): it must be the one `mandate serve` uses"
        ));
    }
    out
}

/// The admin bearer token. `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// The token from `--admin-token-file` when given, else from the `MANDATE_ADMIN_TOKEN` value `env`.
    pub fn resolve(file: Option<&Path>, env: Option<String>) -> Result<Self, ClientError> {
        if let Some(path) = file {
            let bad = |why: String| ClientError::BadTokenFile {
                path: path.to_owned(),
                why,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            return Self::checked(text.trim()).map_err(bad);
        }
        match env {
            Some(v) if !v.trim().is_empty() => {
                Self::checked(v.trim()).map_err(ClientError::BadTokenEnv)
            }
            _ => Err(ClientError::NoToken),
        }
    }

    fn checked(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Err("is empty".to_owned());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the token holds spaces or non-ASCII characters, which cannot be sent".to_owned(),
            );
        }
        Ok(Self(token.to_owned()))
    }

    fn header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .expect("checked: visible ASCII only");
        v.set_sensitive(true);
        v
    }
}

/// The parts of `--server` a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https` (default) or `http`.
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path prefix before `/v1/…`, without a trailing slash ("" normally).
    pub base_path: String,
}

impl Endpoint {
    /// Parses `https://host[:port][/prefix]` or `http://…`.
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(bad("the scheme must be https or http")),
            None => return Err(bad("the URL needs a scheme, https://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.query().is_some() {
            return Err(bad("a query string makes no sense here"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad(
                "credentials do not belong in the URL; use the admin token",
            ));
        }
        Ok(Self {
            https,
            host,
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `host:port` as it goes into a URL or a `Host` header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The server's URL as the operator gave it, normalised.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority(), self.base_path)
    }
}

/// One request to the API: method, path under `/v1`, query pairs and an optional JSON body.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path segments joined as given (already escaped where needed, see [`segment`]).
    pub path: String,
    /// Query pairs, percent-encoded when the request is built.
    pub query: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Option<Vec<u8>>,
}

impl ApiRequest {
    /// A GET of `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            query: Vec::new(),
            body: None,
        }
    }

    /// A POST of `path` with `body` serialised as JSON (none: an empty body).
    pub fn post(path: impl Into<String>, body: Option<&impl Serialize>) -> Self {
        Self {
            method: Method::POST,
            path: path.into(),
            query: Vec::new(),
            body: body.map(|b| serde_json::to_vec(b).expect("request bodies serialise")),
        }
    }

    /// Adds a query pair.
    pub fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    fn path_and_query(&self, endpoint: &Endpoint) -> String {
        let mut pq = format!("{}{}", endpoint.base_path, self.path);
        if !self.query.is_empty() {
            pq.push('?');
            pq.push_str(&encode_query(&self.query));
        }
        pq
    }
}

/// Percent-encodes query pairs; what is left unescaped means the same in a form-encoded query.
fn encode_query(pairs: &[(&str, String)]) -> String {
    const QUERY: &AsciiSet = &SEGMENT.remove(b'*');
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, QUERY),
                utf8_percent_encode(v, QUERY)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Escapes one path segment (a workload name, a version).
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The API client.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    tls: Option<(TlsConnector, PathBuf)>,
    /// The admin token; none for a client authenticating with a workload's certificate.
    token: Option<AdminToken>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.endpoint.url())
            .field("ca_cert", &self.tls.as_ref().map(|(_, path)| path))
            .field("token", &self.token)
            .finish()
    }
}

impl Client {
    /// Builds a client from the command-line options and the `MANDATE_ADMIN_TOKEN` variable.
    pub fn from_args(args: &ServerArgs) -> Result<Self, ClientError> {
        let token = AdminToken::resolve(
            args.admin_token_file.as_deref(),
            std::env::var(ADMIN_TOKEN_ENV).ok(),
        )?;
        Self::new(&args.server, args.ca_cert.as_deref(), token)
    }

    /// A client for `server`, trusting the CA in `ca_cert` (required for https).
    pub fn new(
        server: &str,
        ca_cert: Option<&Path>,
        token: AdminToken,
    ) -> Result<Self, ClientError> {
        let endpoint = Endpoint::parse(server)?;
        let tls = if endpoint.https {
            let (bundle, path) = read_ca(&endpoint, ca_cert)?;
            let config =
                tls::client_config(&bundle).map_err(|e| ClientError::BadCa(e.to_string()))?;
            Some((TlsConnector::from(Arc::new(config)), path.to_owned()))
        } else {
            None
        };
        Ok(Self {
            endpoint,
            tls,
            token: Some(token),
        })
    }

    /// A client for the sidecar endpoints of `server` (https only), presenting the workload
    /// certificate chain in `cert` and its key in `key` (PEM files, e.g. an agent's SVID), and
    /// no admin token.
    pub fn with_identity(
        server: &str,
        ca_cert: Option<&Path>,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, ClientError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let endpoint = Endpoint::parse(server)?;
        if !endpoint.https {
            return Err(ClientError::BadUrl {
                url: endpoint.url(),
                why: "a client certificate needs https".to_owned(),
            });
        }
        let (bundle, path) = read_ca(&endpoint, ca_cert)?;
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Identity(format!("--cert {}: {e}", cert.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Identity(format!(
                "--cert {}: no certificate in the file",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| ClientError::Identity(format!("--key {}: {e}", key.display())))?;
        let config = tls::client_config_with_identity(&bundle, certs, key)
            .map_err(|e| ClientError::Identity(format!("the certificate and key: {e}")))?;
        Ok(Self {
            endpoint,
            tls: Some((TlsConnector::from(Arc::new(config)), path.to_owned())),
            token: None,
        })
    }

    /// Builds the HTTP request for `req` (absolute URI; see [`to_origin_form`] for HTTP/1.1).
    pub fn build(&self, req: &ApiRequest) -> Request<Full<Bytes>> {
        let uri = format!(
            "{}://{}{}",
            if self.endpoint.https { "https" } else { "http" },
            self.endpoint.authority(),
            req.path_and_query(&self.endpoint)
        );
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, token.header());
        }
        if req.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(req.body.clone().unwrap_or_default())))
            .expect("the URI is built from a parsed endpoint and escaped parts")
    }

    /// Sends `req` and decodes a success body as `T`; an error status becomes [`ClientError::Api`].
    pub async fn call<T: DeserializeOwned>(&self, req: &ApiRequest) -> Result<T, ClientError> {
        let request = self.build(req);
        let url = request.uri().to_string();
        let method = req.method.clone();
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, self.send(request))
            .await
            .map_err(|_| ClientError::Http {
                method: method.clone(),
                url: url.clone(),
                why: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            })??;
        decode(method, &url, status, &body)
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let url = self.endpoint.url();
        let method = request.method().clone();
        let full_url = request.uri().to_string();
        let http_err = |e: hyper::Error| ClientError::Http {
            method: method.clone(),
            url: full_url.clone(),
            why: e.to_string(),
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port)),
        )
        .await
        .map_err(|_| ClientError::Connect {
            url: url.clone(),
            why: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
        })?
        .map_err(|e| ClientError::Connect {
            url: url.clone(),
            why: e.to_string(),
        })?;
        let _ = tcp.set_nodelay(true);

        let response = match &self.tls {
            None => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(http_err)?;
                tokio::spawn(conn);
                sender
                    .send_request(to_origin_form(request, &self.endpoint))
                    .await
                    .map_err(http_err)?
            }
            Some((connector, ca_path)) => {
                // The name is only for SNI: the verifier checks the SPIFFE ID, not the name.
                let name = rustls_pki_types::ServerName::try_from(self.endpoint.host.clone())
                    .map_err(|e| ClientError::BadUrl {
                        url: url.clone(),
                        why: format!("host is not a DNS name or IP address: {e}"),
                    })?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ClientError::Tls {
                        url: url.clone(),
                        why: format!("no TLS handshake within {}s", CONNECT_TIMEOUT.as_secs()),
                    })?
                    .map_err(|e| ClientError::Tls {
                        url: url.clone(),
                        why: tls::describe_handshake_error(&e, ca_path),
                    })?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                if h2 {
                    let (mut sender, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .map_err(http_err)?;
                    tokio::spawn(conn);
                    sender.send_request(request).await.map_err(http_err)?
                } else {
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .map_err(http_err)?;
                    tokio::spawn(conn);
                    sender
                        .send_request(to_origin_form(request, &self.endpoint))
                        .await
                        .map_err(http_err)?
                }
            }
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Http {
                method: method.clone(),
                url: full_url.clone(),
                why: format!("reading the answer: {e}"),
            })?
            .to_bytes();
        Ok((status, body))
    }
}

/// Rewrites an absolute-URI request into HTTP/1.1 origin form with a `Host` header.
pub fn to_origin_form(
    mut request: Request<Full<Bytes>>,
    endpoint: &Endpoint,
) -> Request<Full<Bytes>> {
    let pq = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    *request.uri_mut() = pq.parse().expect("a path and query taken from a valid URI");
    let host = HeaderValue::from_str(&endpoint.authority()).expect("host:port is a valid header");
    request.headers_mut().insert(HOST, host);
    request
}

/// Turns a status and body into `T` or the matching [`ClientError`].
pub fn decode<T: DeserializeOwned>(
    method: Method,
    url: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<T, ClientError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| ClientError::BadResponse {
            method,
            url: url.to_owned(),
            why: format!("{e} (HTTP {})", status.as_u16()),
        });
    }
    if let Ok(error) = serde_json::from_slice::<ApiError>(body) {
        return Err(ClientError::Api { status, error });
    }
    let text = String::from_utf8_lossy(body);
    let text = super::table::prefix(text.trim(), 300);
    Err(ClientError::Status {
        method,
        url: url.to_owned(),
        status,
        body: if text.is_empty() {
            "(no body)".to_owned()
        } else {
            clean(text)
        },
    })
}

/// The CA certificate `--ca-cert` names, which an https `endpoint` needs, and its path.
fn read_ca<'a>(
    endpoint: &Endpoint,
    ca_cert: Option<&'a Path>,
) -> Result<(CaBundle, &'a Path), ClientError> {
    let path = ca_cert.ok_or_else(|| ClientError::NoCaCert {
        url: endpoint.url(),
    })?;
    let pem = std::fs::read(path).map_err(|e| {
        ClientError::BadCa(format!(
            "cannot read {}: {e}; it should be the control plane's <data-dir>/ca.pem",
            path.display()
        ))
    })?;
    let bundle = CaBundle::from_pem(&pem, path).map_err(ClientError::BadCa)?;
    Ok((bundle, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn token() -> AdminToken {
        AdminToken::checked("s3cret-token").unwrap()
    }

    fn plain(server: &str) -> Client {
        Client::new(server, None, token()).unwrap()
    }

    #[test]
    fn endpoints_parse_with_default_ports_and_prefixes() {
        let e = Endpoint::parse("https://127.0.0.1:15012").unwrap();
        assert_eq!(
            e,
            Endpoint {
                https: true,
                host: "127.0.0.1".into(),
                port: 15012,
                base_path: String::new()
            }
        );
        assert_eq!(e.url(), "https://127.0.0.1:15012");
        let e = Endpoint::parse("http://cp.example/mandate/").unwrap();
        assert_eq!((e.port, e.base_path.as_str()), (80, "/mandate"));
        let e = Endpoint::parse("https://[::1]").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 443));
        assert_eq!(e.authority(), "[::1]:443");
        for bad in [
            "127.0.0.1:15012",
            "ftp://x",
            "https://",
            "https://u:p@x",
            "https://x/?a=1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_needs_a_ca_certificate_and_the_error_says_where_it_is() {
        let err = Client::new(DEFAULT_SERVER, None, token()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--ca-cert") && text.contains("<data-dir>/ca.pem"),
            "{text}"
        );
        let err = Client::new(
            DEFAULT_SERVER,
            Some(Path::new("/nonexistent/ca.pem")),
            token(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn the_token_comes_from_the_file_first_then_the_environment() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "from-file").unwrap();
        let t = AdminToken::resolve(Some(file.path()), Some("from-env".into())).unwrap();
        assert_eq!(t.0, "from-file");
        let t = AdminToken::resolve(None, Some(" from-env\n".into())).unwrap();
        assert_eq!(t.0, "from-env");
        assert!(matches!(
            AdminToken::resolve(None, None),
            Err(ClientError::NoToken)
        ));
        assert!(matches!(
            AdminToken::resolve(None, Some("  ".into())),
            Err(ClientError::NoToken)
        ));
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = AdminToken::resolve(Some(empty.path()), None).unwrap_err();
        assert!(err.to_string().ends_with("is empty"), "{err}");
        assert!(AdminToken::resolve(None, Some("two words".into())).is_err());
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn requests_carry_the_token_json_headers_and_escaped_paths() {
        let client = plain("http://cp:8080/base");
        let req = ApiRequest::post(
            format!("/v1/agents/{}/suspend", segment("we ird/name")),
            None::<&()>,
        );
        let built = client.build(&req);
        assert_eq!(built.method(), Method::POST);
        assert_eq!(
            built.uri().to_string(),
            "http://cp:8080/base/v1/agents/we%20ird%2Fname/suspend"
        );
        let auth = built.headers().get(AUTHORIZATION).unwrap();
        assert_eq!(auth, "Bearer s3cret-token");
        assert!(auth.is_sensitive());
        assert!(built.headers().get(CONTENT_TYPE).is_none());

        let req = ApiRequest::post("/v1/agents", Some(&serde_json::json!({"name": "a"})));
        let built = client.build(&req);
        assert_eq!(built.headers()[CONTENT_TYPE], "application/json");

        let origin = to_origin_form(built, &client.endpoint);
        assert_eq!(origin.uri().to_string(), "/base/v1/agents");
        assert_eq!(origin.headers()[HOST], "cp:8080");
    }

    #[test]
    fn query_values_are_form_encoded() {
        let client = plain("http://cp");
        let req = ApiRequest::get("/v1/decisions")
            .query("subject", "alice@example.com")
            .query("tool", "read_*")
            .query("since", "2026-01-01T00:00:00+02:00");
        assert_eq!(
            client.build(&req).uri().path_and_query().unwrap().as_str(),
            "/v1/decisions?subject=alice%40example.com&tool=read_*&since=2026-01-01T00%3A00%3A00%2B02%3A00"
        );
    }

    #[test]
    fn error_bodies_become_api_errors_with_every_message() {
        let body = br#"{"error":"policy bundle refused","field":"modules","messages":["p.rego:3: unexpected token\n  allow if {","test_x failed"]}"#;
        let err = decode::<serde_json::Value>(Method::POST, "u", StatusCode::BAD_REQUEST, body)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy bundle refused (HTTP 400)\n  field: modules\n  p.rego:3: unexpected token\n      allow if {\n  test_x failed"
        );

        let err = decode::<serde_json::Value>(
            Method::GET,
            "u",
            StatusCode::UNAUTHORIZED,
            br#"{"error":"admin token required"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("MANDATE_ADMIN_TOKEN"), "{err}");

        let err = decode::<serde_json::Value>(
            Method::GET,
            "http://cp/v1/x",
            StatusCode::BAD_GATEWAY,
            b"<html>\x1b[2J</html>",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GET http://cp/v1/x answered 502 Bad Gateway: <html>\\u{1b}[2J</html>"
        );

        let err = decode::<Vec<u8>>(Method::GET, "u", StatusCode::OK, b"{}").unwrap_err();
        assert!(matches!(err, ClientError::BadResponse { .. }), "{err}");
    }

    /// Serves every connection on a TLS listener with `cert_pem`/`key_pem`, offering `alpn`;
    /// answers with what it saw, or an ApiError 404 on `/v1/missing`.
    async fn tls_server(cert_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> std::net::SocketAddr {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let (status, body) = if req.uri().path() == "/v1/missing" {
                                (
                                    StatusCode::NOT_FOUND,
                                    serde_json::json!({"error": "agent missing not found"}),
                                )
                            } else {
                                let auth = req
                                    .headers()
                                    .get(AUTHORIZATION)
                                    .map(|v| v.to_str().unwrap().to_owned());
                                (
                                    StatusCode::OK,
                                    serde_json::json!({
                                        "version": format!("{:?}", req.version()),
                                        "path": req.uri().path(),
                                        "auth": auth,
                                    }),
                                )
                            };
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn talks_to_the_control_plane_over_h2_and_http1_and_refuses_impostors() {
        use mandate_identity::ca::CertificateAuthority;
        let ca = CertificateAuthority::generate(
            "mandate.local".parse().unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        let issue = |id: &str| {
            ca.issue(&id.parse().unwrap(), Duration::from_secs(3600))
                .unwrap()
        };

        let cp = issue("spiffe://mandate.local/control-plane");
        for (alpn, version) in [(&b"h2"[..], "HTTP/2.0"), (&b"http/1.1"[..], "HTTP/1.1")] {
            let addr = tls_server(&cp.cert_pem, &cp.key_pem, &[alpn]).await;
            let client = Client::new(&format!("https://{addr}"), Some(&ca_path), token()).unwrap();
            let seen: serde_json::Value =
                client.call(&ApiRequest::get("/v1/agents")).await.unwrap();
            assert_eq!(
                seen,
                serde_json::json!({"version": version, "path": "/v1/agents", "auth": "Bearer s3cret-token"})
            );
            let err = client
                .call::<serde_json::Value>(&ApiRequest::get("/v1/missing"))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "agent missing not found (HTTP 404)");
        }

        let agent = issue("spiffe://mandate.local/agent/research");
        let addr = tls_server(&agent.cert_pem, &agent.key_pem, &[b"h2"]).await;
        let client = Client::new(&format!("https://{addr}"), Some(&ca_path), token()).unwrap();
        let err = client
            .call::<serde_json::Value>(&ApiRequest::get("/v1/agents"))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("presented spiffe://mandate.local/agent/research, not spiffe://mandate.local/control-plane"),
            "{err}"
        );

        let stranger = CertificateAuthority::generate(
            "mandate.local".parse().unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let fake = stranger
            .issue(
                &"spiffe://mandate.local/control-plane".parse().unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let addr = tls_server(&fake.cert_pem, &fake.key_pem, &[b"h2"]).await;
        let client = Client::new(&format!("https://{addr}"), Some(&ca_path), token()).unwrap();
        let err = client
            .call::<serde_json::Value>(&ApiRequest::get("/v1/agents"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not issued by the CA in"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url_and_what_to_check() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = plain(&format!("http://{addr}"));
        let err = client
            .call::<serde_json::Value>(&ApiRequest::get("/v1/agents"))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("http://{addr}")) && text.contains("mandate serve"),
            "{text}"
        );
    }
}
