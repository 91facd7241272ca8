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

use mandate_wire::delegation::APPROVAL_ID_HEADER;
use mandate_wire::{
    ApprovalRecord, ApprovalRequest, DecisionRecord, DelegationRecord, DestinationRecord,
    McpRecord, RedeemRequest,
};

use crate::approval::{self, CallShape};
use crate::decisions::DecisionLog;
use crate::delegation::{ControlPlaneCalls, Presented, Verified};
use crate::headers::{ProxyBody, json_response};
use crate::input::{self, CallFacts, Destination, RequestFacts};
use crate::mcp::{self, Call, Rpc};
use crate::metrics::{Direction, Metrics};
use crate::policy::PolicyStore;
use crate::sync::client::ClientError;
use crate::sync::report::Reporter;

/// Response header naming the decision.
pub static DECISION_ID: HeaderName = HeaderName::from_static("x-mandate-decision-id");
/// Response header naming the approval asked for.
pub static APPROVAL_ID: HeaderName = HeaderName::from_static(APPROVAL_ID_HEADER);

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
    /// The policy asked for a person's approval (`allow` stays false until one is redeemed).
    pub require_approval: bool,
    /// The approval the call went ahead on.
    pub approval: Option<ApprovalRecord>,
    /// The approval asked for on this refusal (`approval_id` in the answer).
    pub approval_id: Option<String>,
    /// The `error` word of a refusal: `denied` (a redeemed approval refused too),
    /// `delegation_refused`, `approval_required`.
    pub error: &'static str,
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
            require_approval: false,
            approval: None,
            approval_id: None,
            error: "denied",
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
    delegation: Option<DelegationRecord>,
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

    /// The approval the call goes ahead on, when the policy required one.
    pub fn approval(&self) -> Option<&ApprovalRecord> {
        self.decisions.iter().find_map(|(d, _)| d.approval.as_ref())
    }
}

/// What a call carried besides the request itself, read before caller-sent identity headers are
/// stripped.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The delegation token, verified or refused.
    pub delegation: Presented,
    /// `x-mandate-approval`: the approval to redeem (an error when it is not an approval id).
    pub approval: Option<Result<String, String>>,
    /// Inbound: the approval the caller's sidecar redeemed for this call (`x-mandate-approval`
    /// with `x-mandate-approved-by`), as `{id, approved_by}`.
    pub attested: Option<ApprovalRecord>,
}

impl Credentials {
    /// The verified delegation, if any.
    pub fn verified(&self) -> Option<&Verified> {
        self.delegation.verified().map(|v| &**v)
    }
}

/// Where decision records go: the JSON-lines file, the control plane, both or neither.
#[derive(Default)]
pub struct Recorders {
    /// The standalone decision log (`--decision-log`).
    pub log: Option<DecisionLog>,
    /// The spool to the control plane (managed mode).
    pub control_plane: Option<Reporter>,
}

/// Decides and records calls against the policy in force.
pub struct Authorizer {
    policy: Arc<PolicyStore>,
    recorders: Recorders,
    metrics: Arc<Metrics>,
    enforcement: Enforcement,
    sidecar: String,
    /// Where approvals are asked for and redeemed (managed mode).
    control_plane: Option<Arc<dyn ControlPlaneCalls>>,
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
            control_plane: None,
        }
    }

    /// Asks `cp` for approvals and redeems them there (managed mode).
    pub fn with_control_plane(mut self, cp: Arc<dyn ControlPlaneCalls>) -> Self {
        self.control_plane = Some(cp);
        self
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

    /// Evaluates the policy for one call. Not counted: callers count the final decision (an
    /// approval may still change it).
    fn decide(&self, facts: &CallFacts<'_>) -> Decision {
        let id = Uuid::now_v7();
        match self.policy.current() {
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
                let verdict = result.map_err(|e| e.to_string()).and_then(|verdict| {
                    approval::requires_approval(&verdict.document).map(|req| (verdict, req))
                });
                match verdict {
                    Ok((verdict, require_approval)) => Decision {
                        id,
                        // An approval is asked for whatever `allow` says: it is redeemed first.
                        allow: verdict.allow && !require_approval,
                        enforced: !self.enforcement.dry_run,
                        reason: verdict.reason.unwrap_or_else(|| {
                            if require_approval {
                                "the policy requires a person's approval"
                            } else if verdict.allow {
                                "allowed by policy"
                            } else {
                                "denied by policy"
                            }
                            .to_owned()
                        }),
                        policy_version: version,
                        eval,
                        require_approval,
                        approval: None,
                        approval_id: None,
                        error: "denied",
                    },
                    Err(e) => self.unusable(id, version, e, eval),
                }
            }
        }
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
            require_approval: false,
            approval: None,
            approval_id: None,
            error: "denied",
        }
    }

    /// Counts a final decision.
    fn count(&self, direction: Direction, d: &Decision) {
        self.metrics.decision(direction, d.allow, d.enforced);
    }

    /// A refusal taken before policy (malformed or oversized body): recorded like any decision.
    fn refusal(&self, direction: Direction, reason: String) -> Decision {
        self.metrics.decision(direction, false, true);
        Decision::refusal(reason)
    }

    /// Decides an opaque TCP connection or `CONNECT` tunnel, once, on identity and destination.
    /// It carries no delegation, and no approval: a policy asking for one is a refusal.
    pub fn authorize_tcp(
        &self,
        direction: Direction,
        source: &SpiffeId,
        destination: Destination<'_>,
    ) -> Decision {
        if let Some(refused) = self.spool_refusal(direction, destination) {
            return refused;
        }
        let facts = CallFacts {
            direction,
            source,
            destination,
            request: None,
            mcp: None,
            delegation: None,
        };
        let mut decision = self.decide(&facts);
        if decision.require_approval {
            decision.reason = format!(
                "approval required, but a TCP connection cannot carry one: {}",
                decision.reason
            );
        }
        self.count(direction, &decision);
        let summary = summarize(&facts, None);
        self.record(&summary, &decision, None, None);
        if !decision.proceeds() {
            tracing::info!(destination = %destination.host, port = destination.port, reason = %decision.reason, "TCP connection denied");
        }
        decision
    }

    /// Decides an HTTP call; returns the body to forward (read, if it was read for policy).
    /// `Err` is the response to send instead of forwarding. `credentials` is what the call carried
    /// (delegation token, approval): a refused token refuses the call before policy; a policy
    /// that requires approval has it asked for or redeemed here.
    #[allow(clippy::too_many_arguments)]
    pub async fn authorize_http(
        &self,
        direction: Direction,
        source: &SpiffeId,
        destination: Destination<'_>,
        scheme: &'static str,
        parts: &Parts,
        body: Incoming,
        credentials: &Credentials,
    ) -> Result<(ProxyBody, AuthorizedHttp), Response<ProxyBody>> {
        if let Some(refused) = self.spool_refusal(direction, destination) {
            let body = json!({"error": refused.error, "reason": refused.reason});
            return Err(json_response(StatusCode::SERVICE_UNAVAILABLE, &body));
        }
        let delegation = credentials.verified();
        let summary = summarize(
            &CallFacts {
                direction,
                source,
                destination,
                request: None,
                mcp: None,
                delegation,
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

        // A presented token that did not verify: refused before policy, whatever the policy says.
        if let Presented::Refused(refusal) = &credentials.delegation {
            let mut d = self.refusal(direction, refusal.reason.clone());
            d.error = "delegation_refused";
            tracing::info!(
                direction = direction.as_str(),
                source = %source,
                destination = %destination.host,
                reason = %d.reason,
                decision_id = %d.id,
                "call refused: its delegation token did not verify"
            );
            let calls = rpc.as_ref().map_or(&[][..], Rpc::calls);
            let resp = match &rpc {
                Some(rpc) if calls.iter().any(Call::expects_response) => refused_jsonrpc(rpc, &d),
                _ => denied_http(StatusCode::FORBIDDEN, d.error, &d),
            };
            self.record(
                &summary,
                &d,
                calls.first().map(mcp_record),
                Some(resp.status()),
            );
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
        let mut decisions: Vec<(Decision, Option<&Call>)> = calls
            .into_iter()
            .map(|call| {
                let facts = CallFacts {
                    direction,
                    source,
                    destination,
                    request: Some(request),
                    mcp: call,
                    delegation,
                };
                (self.decide(&facts), call)
            })
            .collect();

        if decisions.iter().any(|(d, _)| d.require_approval) {
            if decisions.len() > 1 {
                for (d, _) in decisions.iter_mut().filter(|(d, _)| d.require_approval) {
                    d.reason = format!(
                        "approval required: {}; a call that needs approval must be sent alone, not in a JSON-RPC batch",
                        d.reason
                    );
                }
            } else {
                let (d, call) = &mut decisions[0];
                let shape = CallShape {
                    source: source.as_str(),
                    host: destination.host,
                    port: destination.port,
                    method: parts.method.as_str(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map_or(parts.uri.path(), |p| p.as_str()),
                    mcp_method: call.and_then(|c| c.method.as_deref()),
                    name: call.and_then(|c| c.name.as_deref()),
                    arguments: match call {
                        Some(c) => Some(&c.input["arguments"]).filter(|a| **a != Value::Undefined),
                        None => json.as_ref(),
                    },
                    subject: delegation.map(Verified::subject),
                };
                self.resolve_approval(d, &shape, credentials, delegation)
                    .await;
            }
        }
        for (d, _) in &decisions {
            self.count(direction, d);
        }

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
                _ => denied_http(StatusCode::FORBIDDEN, denied.error, denied),
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

    /// The policy asked for approval of this (single) call: take the approval the caller's
    /// sidecar redeemed (inbound), redeem the one the call carries, or ask for one. Dry-run asks
    /// nobody: the call is recorded as refused and forwarded.
    async fn resolve_approval(
        &self,
        d: &mut Decision,
        shape: &CallShape<'_>,
        credentials: &Credentials,
        delegation: Option<&Verified>,
    ) {
        if !d.enforced {
            d.reason = format!("approval required: {}", d.reason);
            return;
        }
        if let Some(attested) = &credentials.attested {
            d.allow = true;
            d.reason = format!(
                "approved by {} (approval {}, redeemed by the caller's sidecar)",
                attested.approved_by, attested.id
            );
            d.approval = Some(attested.clone());
            return;
        }
        let Some(cp) = &self.control_plane else {
            d.reason = format!(
                "approval required, but this sidecar has no control plane to ask: {}",
                d.reason
            );
            return;
        };
        let fingerprint = approval::fingerprint(shape);
        match &credentials.approval {
            Some(Err(why)) => {
                d.reason = format!("approval refused: {why}");
                self.metrics.approval("refused");
            }
            Some(Ok(id)) => match cp.redeem(id.clone(), RedeemRequest { fingerprint }).await {
                Ok(redeemed) => {
                    self.metrics.approval("redeemed");
                    d.allow = true;
                    d.reason = format!("approved by {} (approval {id})", redeemed.approved_by);
                    d.approval = Some(ApprovalRecord {
                        id: id.clone(),
                        approved_by: redeemed.approved_by,
                    });
                }
                Err(e) => {
                    self.metrics.approval("refused");
                    d.reason = match &e {
                        // The control plane names the approval and why (pending, used, ...).
                        ClientError::Api { error, .. } => format!("approval refused: {error}"),
                        e => format!("approval {id} could not be redeemed: {e}"),
                    };
                }
            },
            None => {
                let request = ApprovalRequest {
                    decision_id: d.id.to_string(),
                    fingerprint,
                    action: describe(shape),
                    reason: d.reason.clone(),
                    subject: delegation.map(|v| v.claims.sub.clone()),
                    grant_id: delegation.map(|v| v.claims.grant_id.clone()),
                    policy_version: d.policy_version.clone(),
                };
                match cp.request_approval(request).await {
                    Ok(ticket) => {
                        self.metrics.approval("requested");
                        d.error = "approval_required";
                        d.reason = format!(
                            "approval required: {} (approval {} requested: retry with x-mandate-approval: {} once a person has approved it)",
                            d.reason, ticket.id, ticket.id
                        );
                        d.approval_id = Some(ticket.id);
                    }
                    Err(e) => {
                        d.reason = format!(
                            "approval required, but asking the control plane for it failed ({}): {}",
                            cp_words(&e),
                            d.reason
                        );
                    }
                }
            }
        }
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
            delegation: None,
        };
        if let Some(refused) = self.spool_refusal(direction, destination) {
            return refused;
        }
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

    /// Managed mode with `--spool-full=refuse`: when the spool to the control plane cannot take
    /// another record, the call is refused before anything else, and not recorded (it is not
    /// acted on; recording it would only grow the spool): counted instead.
    fn spool_refusal(
        &self,
        direction: Direction,
        destination: Destination<'_>,
    ) -> Option<Decision> {
        let why = self.recorders.control_plane.as_ref()?.refusal()?;
        self.metrics.spool_full_refusals.inc();
        let mut d = Decision::refusal(format!(
            "{why}; calls are refused until the control plane takes the backlog"
        ));
        d.error = "spool_full";
        tracing::info!(
            direction = direction.as_str(),
            destination = %destination.host,
            reason = %d.reason,
            "call refused: the decision spool is full (mandate_spool_full_refusals_total)"
        );
        Some(d)
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
            delegation: summary.delegation.clone(),
            approval: d.approval.clone(),
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
        delegation: facts.delegation.map(Verified::record),
    }
}

/// The control plane's own words for a refusal, else the error.
fn cp_words(e: &ClientError) -> String {
    match e {
        ClientError::Api { error, .. } => error.clone(),
        other => other.to_string(),
    }
}

/// The call, described for the person asked to approve it.
fn describe(shape: &CallShape<'_>) -> String {
    let on_behalf = shape
        .subject
        .map(|s| format!(" on behalf of {s}"))
        .unwrap_or_default();
    match (shape.mcp_method, shape.name) {
        (Some(method), Some(name)) => format!(
            "{} calls {method} {name} at {}:{}{on_behalf}",
            shape.source, shape.host, shape.port
        ),
        _ => format!(
            "{} calls {} {}:{}{}{on_behalf}",
            shape.source, shape.method, shape.host, shape.port, shape.path
        ),
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
    let mut data = json!({"reason": d.reason, "decision_id": d.id.to_string(), "policy_version": d.policy_version});
    if let Some(id) = &d.approval_id {
        data["approval_id"] = json!(id);
    }
    data
}

/// The 403 JSON body of DESIGN.md for a denied call.
pub fn denied_response(d: &Decision) -> Response<ProxyBody> {
    denied_http(StatusCode::FORBIDDEN, "denied", d)
}

/// A 403 JSON body with another `error` word (`delegation_refused`, ...).
pub fn refused_response(error: &str, d: &Decision) -> Response<ProxyBody> {
    denied_http(StatusCode::FORBIDDEN, error, d)
}

/// The 403 (or other status) JSON body of DESIGN.md.
fn denied_http(status: StatusCode, error: &str, d: &Decision) -> Response<ProxyBody> {
    let mut body = json!({"error": error, "reason": d.reason, "decision_id": d.id.to_string(), "policy_version": d.policy_version});
    if let Some(id) = &d.approval_id {
        body["approval_id"] = json!(id);
    }
    let mut resp = json_response(status, &body);
    stamp_decision(&mut resp, d);
    resp
}

fn jsonrpc_response(
    status: StatusCode,
    body: &serde_json::Value,
    d: &Decision,
) -> Response<ProxyBody> {
    let mut resp = json_response(status, body);
    stamp_decision(&mut resp, d);
    resp
}

/// `x-mandate-decision-id`, and `x-mandate-approval-id` when an approval was asked for.
fn stamp_decision(resp: &mut Response<ProxyBody>, d: &Decision) {
    resp.headers_mut()
        .insert(DECISION_ID.clone(), d.header_value());
    if let Some(id) = d
        .approval_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        resp.headers_mut().insert(APPROVAL_ID.clone(), id);
    }
}

/// The JSON-RPC message of a refusal: the policy's reason for a denial, the reason itself for the
/// sidecar's own refusals (which say what they are).
fn refusal_message(d: &Decision) -> String {
    if d.error == "denied" && !d.require_approval {
        format!("denied by policy: {}", d.reason)
    } else {
        d.reason.clone()
    }
}

/// JSON-RPC errors for a message or batch refused as a whole by one decision taken before policy
/// (a delegation token that did not verify).
fn refused_jsonrpc(rpc: &Rpc, d: &Decision) -> Response<ProxyBody> {
    let message = refusal_message(d);
    let error_for =
        |call: &Call| mcp::error_response(&call.id, mcp::DENIED, &message, decision_data(d));
    let body = match rpc {
        Rpc::Single(call) => error_for(call),
        Rpc::Batch(calls) => serde_json::Value::Array(
            calls
                .iter()
                .filter(|c| c.expects_response())
                .map(error_for)
                .collect(),
        ),
    };
    jsonrpc_response(StatusCode::OK, &body, d)
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
            (refusal_message(d), decision_data(d))
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
