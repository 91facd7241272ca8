//! Authorization of every call: build the input document, evaluate the policy, apply dry-run and
//! fail-open, answer denials (a 403 JSON body, or a JSON-RPC error carrying the request's id), and
//! record one decision per call.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use mandate_identity::SpiffeId;
use mandate_rego::Value;
use serde_json::json;
use uuid::Uuid;

use mandate_wire::{DecisionRecord, DestinationRecord, McpRecord};

use crate::decisions::DecisionLog;
use crate::headers::{ProxyBody, json_response};
use crate::input::{self, CallFacts, Destination, RequestFacts};
use crate::mcp::{self, Call, Rpc};
use crate::metrics::{Direction, Metrics};
use crate::policy::PolicyStore;
use crate::sync::report::DecisionQueue;

/// Response header naming the decision.
pub static DECISION_ID: HeaderName = HeaderName::from_static("x-mandate-decision-id");

/// How decisions are applied.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Enforcement {
    /// Evaluate and record, but forward whatever the verdict.
    pub dry_run: bool,
    /// Allow when the policy gives no usable decision (undefined, error, timeout, none loaded).
    pub fail_open: bool,
    /// Largest JSON body read for policy; larger JSON bodies are refused.
    pub body_limit: usize,
}

/// One decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// UUIDv7.
    pub id: Uuid,
    /// The verdict (after fail-open).
    pub allow: bool,
    /// False in dry-run.
    pub enforced: bool,
    /// Why.
    pub reason: String,
    /// The policy version that decided.
    pub policy_version: Option<String>,
    /// Evaluation time.
    pub eval: Duration,
}

impl Decision {
    /// A refusal taken before policy (no route, an inactive workload, a malformed request).
    pub fn refusal(reason: String) -> Self {
        Self {
            id: Uuid::now_v7(),
            allow: false,
            enforced: true,
            reason,
            policy_version: None,
            eval: Duration::ZERO,
        }
    }

    /// Whether the call goes ahead.
    pub fn proceeds(&self) -> bool {
        self.allow || !self.enforced
    }

    /// The id as an `x-mandate-decision-id` value.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.id.to_string()).expect("a UUID is a valid header value")
    }
}

/// What is recorded about a call besides its decisions, captured once at decision time.
struct CallSummary {
    direction: Direction,
    source: String,
    destination: DestinationRecord,
    method: Option<String>,
    path: Option<String>,
    trace_id: Option<String>,
}

/// An authorised HTTP call on its way upstream, to be recorded once the response is known.
pub struct AuthorizedHttp {
    decisions: Vec<(Decision, Option<McpRecord>)>,
    summary: CallSummary,
}

impl AuthorizedHttp {
    /// `x-mandate-decision-id` for the call (its first decision; a batch has one per element).
    pub fn decision_id(&self) -> Option<HeaderValue> {
        self.decisions.first().map(|(d, _)| d.header_value())
    }
}

/// Where decision records go: the JSON-lines file, the control plane, both or neither.
#[derive(Default)]
pub struct Recorders {
    /// The standalone decision log (`--decision-log`).
    pub log: Option<DecisionLog>,
    /// The queue of batches to the control plane (managed mode).
    pub control_plane: Option<DecisionQueue>,
}

/// Decides and records calls against the policy in force.
pub struct Authorizer {
    policy: Arc<PolicyStore>,
    recorders: Recorders,
    metrics: Arc<Metrics>,
    enforcement: Enforcement,
    sidecar: String,
}

impl Authorizer {
    /// An authorizer over `policy`, recording to `recorders`.
    pub fn new(
        policy: Arc<PolicyStore>,
        recorders: Recorders,
        metrics: Arc<Metrics>,
        enforcement: Enforcement,
    ) -> Self {
        let sidecar = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            policy,
            recorders,
            metrics,
            enforcement,
            sidecar,
        }
    }

    /// Whether a policy is in force (readiness).
    pub fn has_policy(&self) -> bool {
        self.policy.current().is_some()
    }

    /// The policy store decisions are taken against.
    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.policy
    }

    /// Waits until the decision log has written everything queued, and (managed mode) until the
    /// control plane has every record, within `timeout` (shutdown).
    pub async fn flush(&self, timeout: Duration) {
        if let Some(log) = &self.recorders.log {
            log.flush(Duration::from_secs(2));
        }
        if let Some(queue) = &self.recorders.control_plane {
            queue.flush(timeout).await;
        }
    }

    fn decide(&self, facts: &CallFacts<'_>) -> Decision {
        let id = Uuid::now_v7();
        let decision = match self.policy.current() {
            None => self.unusable(
                id,
                None,
                self.policy.missing_reason().to_owned(),
                Duration::ZERO,
            ),
            Some(loaded) => {
                let registry =
                    loaded.registry_entry(facts.source.kind().as_str(), facts.source.name());
                let input = input::document(facts, registry);
                let start = Instant::now();
                let result = loaded.policy.evaluate(input);
                let eval = start.elapsed();
                self.metrics.policy_eval.observe(eval.as_secs_f64());
                let version = Some(loaded.version().to_owned());
                match result {
                    Ok(verdict) => Decision {
                        id,
                        allow: verdict.allow,
                        enforced: !self.enforcement.dry_run,
                        reason: verdict.reason.unwrap_or_else(|| {
                            if verdict.allow {
                                "allowed by policy"
                            } else {
                                "denied by policy"
                            }
                            .to_owned()
                        }),
                        policy_version: version,
                        eval,
                    },
                    Err(e) => self.unusable(id, version, e.to_string(), eval),
                }
            }
        };
        self.metrics
            .decision(facts.direction, decision.allow, decision.enforced);
        decision
    }

    /// No usable verdict: deny, unless fail-open was chosen.
    fn unusable(
        &self,
        id: Uuid,
        policy_version: Option<String>,
        reason: String,
        eval: Duration,
    ) -> Decision {
        let fail_open = self.enforcement.fail_open;
        Decision {
            id,
            allow: fail_open,
            enforced: !self.enforcement.dry_run,
            reason: if fail_open {
                format!("{reason}; allowed because --fail-open is set")
            } else {
                reason
            },
            policy_version,
            eval,
        }
    }

    /// A refusal taken before policy (malformed or oversized body): recorded like any decision.
    fn refusal(&self, direction: Direction, reason: String) -> Decision {
        self.metrics.decision(direction, false, true);
        Decision::refusal(reason)
    }

    /// Decides an opaque TCP connection or `CONNECT` tunnel, once, on identity and destination.
    pub fn authorize_tcp(
        &self,
        direction: Direction,
        source: &SpiffeId,
        destination: Destination<'_>,
    ) -> Decision {
        let facts = CallFacts {
            direction,
            source,
            destination,
            request: None,
            mcp: None,
        };
        let decision = self.decide(&facts);
        let summary = summarize(&facts, None);
        self.record(&summary, &decision, None, None);
        if !decision.proceeds() {
            tracing::info!(destination = %destination.host, port = destination.port, reason = %decision.reason, "TCP connection denied");
        }
        decision
    }

    /// Decides an HTTP call; returns the body to forward (read, if it was read for policy).
    /// `Err` is the response to send instead of forwarding.
    pub async fn authorize_http(
        &self,
        direction: Direction,
        source: &SpiffeId,
        destination: Destination<'_>,
        scheme: &'static str,
        parts: &Parts,
        body: Incoming,
    ) -> Result<(ProxyBody, AuthorizedHttp), Response<ProxyBody>> {
        let summary = summarize(
            &CallFacts {
                direction,
                source,
                destination,
                request: None,
                mcp: None,
            },
            Some(parts),
        );
        let deny_early = |decision: Decision, status: StatusCode, error: &str| {
            let resp = denied_http(status, error, &decision);
            self.record(&summary, &decision, None, Some(resp.status()));
            resp
        };

        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let (body, json, size) = if is_json(parts) {
            let limit = self.enforcement.body_limit;
            if content_length.is_some_and(|n| n > limit as u64) {
                let d = self.refusal(direction, format!("JSON body of {} bytes exceeds the {limit}-byte limit for policy inspection", content_length.unwrap_or(0)));
                return Err(deny_early(
                    d,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                ));
            }
            let bytes: Bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e)
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some() =>
                {
                    let d = self.refusal(
                        direction,
                        format!("JSON body exceeds the {limit}-byte limit for policy inspection"),
                    );
                    return Err(deny_early(
                        d,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                    ));
                }
                Err(e) => {
                    let d = self.refusal(direction, format!("request body could not be read: {e}"));
                    return Err(deny_early(d, StatusCode::BAD_REQUEST, "bad_request"));
                }
            };
            let json = if bytes.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        let d = self.refusal(
                            direction,
                            format!("request body is declared JSON but does not parse: {e}"),
                        );
                        return Err(deny_early(d, StatusCode::BAD_REQUEST, "bad_request"));
                    }
                }
            };
            let size = bytes.len() as u64;
            (Either::Right(Full::new(bytes)), json, Some(size))
        } else {
            (Either::Left(body), None, content_length)
        };

        let rpc = match json.as_ref().map(mcp::parse).transpose() {
            Ok(rpc) => rpc.flatten(),
            Err(why) => {
                let d = self.refusal(direction, format!("malformed JSON-RPC: {why}"));
                let resp = jsonrpc_response(
                    StatusCode::BAD_REQUEST,
                    &mcp::error_response(&Value::Null, -32600, &d.reason, decision_data(&d)),
                    &d,
                );
                self.record(&summary, &d, None, Some(resp.status()));
                return Err(resp);
            }
        };
        if let Some(Rpc::Single(call)) = &rpc
            && let Err(why) = mcp::check_headers(&parts.headers, call)
        {
            let d = self.refusal(direction, why);
            let resp = jsonrpc_response(
                StatusCode::BAD_REQUEST,
                &mcp::error_response(&call.id, mcp::HEADER_MISMATCH, &d.reason, decision_data(&d)),
                &d,
            );
            self.record(&summary, &d, Some(mcp_record(call)), Some(resp.status()));
            return Err(resp);
        }

        let request = RequestFacts {
            parts,
            scheme,
            size,
            body: json.as_ref(),
        };
        let calls: Vec<Option<&Call>> = match &rpc {
            None => vec![None],
            Some(rpc) => rpc.calls().iter().map(Some).collect(),
        };
        let decisions: Vec<(Decision, Option<&Call>)> = calls
            .into_iter()
            .map(|call| {
                let facts = CallFacts {
                    direction,
                    source,
                    destination,
                    request: Some(request),
                    mcp: call,
                };
                (self.decide(&facts), call)
            })
            .collect();

        if let Some((denied, _)) = decisions.iter().find(|(d, _)| !d.proceeds()) {
            tracing::info!(
                direction = direction.as_str(),
                source = %source,
                destination = %destination.host,
                reason = %denied.reason,
                decision_id = %denied.id,
                "call denied"
            );
            let resp = match &rpc {
                Some(rpc) if rpc.calls().iter().any(Call::expects_response) => {
                    denied_jsonrpc(rpc, &decisions)
                }
                _ => denied_http(StatusCode::FORBIDDEN, "denied", denied),
            };
            for (d, call) in &decisions {
                self.record(&summary, d, call.map(mcp_record), Some(resp.status()));
            }
            return Err(resp);
        }
        Ok((
            body,
            AuthorizedHttp {
                decisions: decisions
                    .into_iter()
                    .map(|(d, c)| (d, c.map(mcp_record)))
                    .collect(),
                summary,
            },
        ))
    }

    /// Records a call refused before policy could decide it (no route, an inactive workload), and
    /// returns its decision. `parts` is the HTTP request, absent for TCP.
    pub fn refuse(
        &self,
        direction: Direction,
        source: &SpiffeId,
        destination: Destination<'_>,
        parts: Option<&Parts>,
        reason: String,
    ) -> Decision {
        let facts = CallFacts {
            direction,
            source,
            destination,
            request: None,
            mcp: None,
        };
        let decision = self.refusal(direction, reason);
        self.record(
            &summarize(&facts, parts),
            &decision,
            None,
            parts.map(|_| StatusCode::FORBIDDEN),
        );
        decision
    }

    /// Stamps the decision id on the upstream's response and records the call's decisions.
    pub fn finish(&self, call: AuthorizedHttp, resp: &mut Response<ProxyBody>) {
        if let Some((first, _)) = call.decisions.first() {
            resp.headers_mut()
                .insert(DECISION_ID.clone(), first.header_value());
        }
        for (d, mcp) in call.decisions {
            self.record(&call.summary, &d, mcp, Some(resp.status()));
        }
    }

    fn record(
        &self,
        summary: &CallSummary,
        d: &Decision,
        mcp: Option<McpRecord>,
        status: Option<StatusCode>,
    ) {
        let Recorders { log, control_plane } = &self.recorders;
        if log.is_none() && control_plane.is_none() {
            return;
        }
        let record = DecisionRecord {
            decision_id: d.id.to_string(),
            timestamp: humantime::format_rfc3339_micros(uuid_time(&d.id)).to_string(),
            direction: summary.direction,
            source: summary.source.clone(),
            destination: summary.destination.clone(),
            method: summary.method.clone(),
            path: summary.path.clone(),
            mcp,
            delegation: None,
            approval: None,
            allow: d.allow,
            enforced: d.enforced,
            reason: d.reason.clone(),
            policy_version: d.policy_version.clone(),
            eval_us: d.eval.as_micros() as u64,
            trace_id: summary.trace_id.clone(),
            sidecar: self.sidecar.clone(),
            status: status.map(|s| s.as_u16()),
        };
        match (log, control_plane) {
            (Some(log), Some(queue)) => {
                log.record(record.clone());
                queue.record(record);
            }
            (Some(log), None) => log.record(record),
            (None, Some(queue)) => queue.record(record),
            (None, None) => {}
        }
    }
}

fn summarize(facts: &CallFacts<'_>, parts: Option<&Parts>) -> CallSummary {
    CallSummary {
        direction: facts.direction,
        source: facts.source.to_string(),
        destination: DestinationRecord {
            host: facts.destination.host.to_owned(),
            port: facts.destination.port,
            spiffe_id: facts.destination.id.map(ToString::to_string),
        },
        method: parts.map(|p| p.method.to_string()),
        path: parts.map(|p| p.uri.path().to_owned()),
        trace_id: parts.and_then(|p| crate::trace::trace_id(&p.headers)),
    }
}

fn uuid_time(id: &Uuid) -> SystemTime {
    id.get_timestamp()
        .map(|ts| {
            let (secs, nanos) = ts.to_unix();
            SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
        })
        .unwrap_or_else(SystemTime::now)
}

fn mcp_record(call: &Call) -> McpRecord {
    McpRecord {
        method: call.method.clone(),
        name: call.name.clone(),
    }
}

fn is_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"))
}

fn decision_data(d: &Decision) -> serde_json::Value {
    json!({"reason": d.reason, "decision_id": d.id.to_string(), "policy_version": d.policy_version})
}

/// The 403 JSON body of DESIGN.md for a denied call.
pub fn denied_response(d: &Decision) -> Response<ProxyBody> {
    denied_http(StatusCode::FORBIDDEN, "denied", d)
}

/// The 403 (or other status) JSON body of DESIGN.md.
fn denied_http(status: StatusCode, error: &str, d: &Decision) -> Response<ProxyBody> {
    let mut resp = json_response(
        status,
        &json!({"error": error, "reason": d.reason, "decision_id": d.id.to_string(), "policy_version": d.policy_version}),
    );
    resp.headers_mut()
        .insert(DECISION_ID.clone(), d.header_value());
    resp
}

fn jsonrpc_response(
    status: StatusCode,
    body: &serde_json::Value,
    d: &Decision,
) -> Response<ProxyBody> {
    let mut resp = json_response(status, body);
    resp.headers_mut()
        .insert(DECISION_ID.clone(), d.header_value());
    resp
}

/// JSON-RPC errors for a denied message or batch; a batch is refused whole.
fn denied_jsonrpc(rpc: &Rpc, decisions: &[(Decision, Option<&Call>)]) -> Response<ProxyBody> {
    let first_denied = decisions
        .iter()
        .position(|(d, _)| !d.proceeds())
        .expect("a denied element");
    let denied = &decisions[first_denied].0;
    let error_for = |(d, call): &(Decision, Option<&Call>)| {
        let call = call.expect("JSON-RPC decisions carry their call");
        let (message, data) = if d.proceeds() {
            (
                format!(
                    "batch refused: element {first_denied} was denied: {}",
                    denied.reason
                ),
                decision_data(denied),
            )
        } else {
            (format!("denied by policy: {}", d.reason), decision_data(d))
        };
        mcp::error_response(&call.id, mcp::DENIED, &message, data)
    };
    let body = match rpc {
        Rpc::Single(_) => error_for(&decisions[0]),
        Rpc::Batch(calls) => serde_json::Value::Array(
            decisions
                .iter()
                .zip(calls)
                .filter(|(_, call)| call.expects_response())
                .map(|(d, _)| error_for(d))
                .collect(),
        ),
    };
    // JSON-RPC errors travel in a 200 response so MCP clients hand them to the model.
    jsonrpc_response(StatusCode::OK, &body, denied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let parts = |ct: &str| {
            http::Request::post("/")
                .header("content-type", ct)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert!(is_json(&parts("application/json")));
        assert!(is_json(&parts("Application/JSON; charset=utf-8")));
        assert!(is_json(&parts("application/vnd.api+json")));
        assert!(!is_json(&parts("text/plain")));
    }
}
