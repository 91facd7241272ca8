//! `mandate approve`: decide the calls a policy held for a person's approval
//! (`POST /v1/approvals/{id}/approve|reject`), or list those waiting (`GET /v1/approvals`).

use std::io::Write;
use std::process::ExitCode;

use clap::{ArgGroup, Args};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{ApiRequest, Client, ServerArgs, segment};
use super::table::{Table, clean, or_dash, short_id};

/// How many pending approvals `--pending` asks for (the server's maximum is larger).
const PENDING_LIMIT: u32 = 1000;

/// Arguments of `mandate approve`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["id", "pending"])))]
pub struct ApproveArgs {
    /// Where the control plane is.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The approval to decide: the id the refused call reported (`approval_id`,
    /// `x-mandate-approval-id`) or `--pending` lists.
    #[arg(value_name = "ID", requires = "by", conflicts_with = "pending")]
    pub id: Option<String>,
    /// Who decides: recorded with the approval and named in the audit trail of the call.
    #[arg(long, value_name = "WHO", requires = "id")]
    pub by: Option<String>,
    /// Reject the call instead of approving it.
    #[arg(long, requires = "id")]
    pub reject: bool,
    /// List the approvals waiting for a decision instead: id, agent, action, reason, subject,
    /// when asked and when they expire.
    #[arg(long)]
    pub pending: bool,
    /// With --pending: print the approvals as JSON lines instead of a table.
    #[arg(long, requires = "pending")]
    pub json: bool,
}

/// Body of `POST /v1/approvals/{id}/approve`.
#[derive(Debug, Serialize)]
struct ApproveBody<'a> {
    approved_by: &'a str,
}

/// Body of `POST /v1/approvals/{id}/reject`.
#[derive(Debug, Serialize)]
struct RejectBody<'a> {
    rejected_by: &'a str,
}

/// An approval, as the API returns it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Approval {
    /// Its id.
    pub id: String,
    /// The asking agent's SPIFFE ID.
    pub agent: String,
    /// The held call, in words.
    pub action: String,
    /// Why the policy asked.
    #[serde(default)]
    pub reason: String,
    /// On whose behalf.
    #[serde(default)]
    pub subject: Option<String>,
    /// pending, approved, rejected, used or expired.
    pub status: String,
    /// When asked (RFC 3339).
    #[serde(default)]
    pub requested_at: String,
    /// When it expires (RFC 3339).
    #[serde(default)]
    pub expires_at: String,
    /// Who decided.
    #[serde(default)]
    pub decided_by: Option<String>,
}

/// `{approvals: [..]}`.
#[derive(Debug, Deserialize)]
struct ApprovalList {
    approvals: Vec<Value>,
}

/// The request that decides approval `id`.
pub fn decide_request(id: &str, by: &str, reject: bool) -> ApiRequest {
    let path = |verb: &str| format!("/v1/approvals/{}/{verb}", segment(id));
    if reject {
        ApiRequest::post(path("reject"), Some(&RejectBody { rejected_by: by }))
    } else {
        ApiRequest::post(path("approve"), Some(&ApproveBody { approved_by: by }))
    }
}

/// The request that lists pending approvals.
pub fn pending_request() -> ApiRequest {
    ApiRequest::get("/v1/approvals")
        .query("status", "pending")
        .query("limit", PENDING_LIMIT.to_string())
}

/// Runs `mandate approve …`.
pub fn main(args: ApproveArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_args(&args.server)?;
    super::block_on(run(&args, &client, &mut std::io::stdout().lock()))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one `mandate approve`, printing to `out`.
pub async fn run(args: &ApproveArgs, client: &Client, out: &mut impl Write) -> anyhow::Result<()> {
    match (&args.id, &args.by) {
        (Some(id), Some(by)) => {
            let decided: Approval = client.call(&decide_request(id, by, args.reject)).await?;
            write!(out, "{}", decided_text(&decided))?;
        }
        _ => {
            let list: ApprovalList = client.call(&pending_request()).await?;
            if args.json {
                for approval in &list.approvals {
                    writeln!(out, "{}", serde_json::to_string(approval)?)?;
                }
            } else {
                let approvals = list
                    .approvals
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<Vec<Approval>, _>>()?;
                write!(out, "{}", pending_table(&approvals))?;
            }
        }
    }
    Ok(())
}

/// What was decided, for the operator.
pub fn decided_text(a: &Approval) -> String {
    let verb = match a.status.as_str() {
        "rejected" => "rejected",
        _ => "approved",
    };
    let mut out = format!(
        "{verb} {} for {}: {}\n",
        clean(&a.id),
        clean(short_id(&a.agent)),
        clean(&a.action)
    );
    if let Some(subject) = &a.subject {
        out.push_str(&format!("  on behalf of: {}\n", clean(subject)));
    }
    if !a.reason.is_empty() {
        out.push_str(&format!("  policy said:  {}\n", clean(&a.reason)));
    }
    if let Some(by) = &a.decided_by {
        out.push_str(&format!("  decided by:   {}\n", clean(by)));
    }
    if verb == "approved" {
        out.push_str(&format!(
            "The agent's retried call may now go through, once, until {}.\n",
            clean(&a.expires_at)
        ));
    } else {
        out.push_str("The agent's retried call will be refused.\n");
    }
    out
}

/// `ID  AGENT  ACTION  REASON  SUBJECT  REQUESTED  EXPIRES`.
pub fn pending_table(approvals: &[Approval]) -> String {
    let mut t = Table::new(&[
        "ID",
        "AGENT",
        "ACTION",
        "REASON",
        "SUBJECT",
        "REQUESTED",
        "EXPIRES",
    ]);
    for a in approvals {
        t.row([
            a.id.clone(),
            short_id(&a.agent).to_owned(),
            a.action.clone(),
            a.reason.clone(),
            or_dash(a.subject.as_ref()),
            a.requested_at.clone(),
            a.expires_at.clone(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: ApproveArgs,
    }

    fn parse(args: &[&str]) -> Result<ApproveArgs, clap::Error> {
        let mut argv = vec!["approve"];
        argv.extend_from_slice(args);
        P::try_parse_from(argv).map(|p| p.a)
    }

    fn approval(status: &str) -> Approval {
        serde_json::from_value(serde_json::json!({
            "id": "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b",
            "agent": "spiffe://mandate.local/agent/research",
            "decision_id": "d", "fingerprint": "ff",
            "action": "mcp tools/call delete_file on tool:8080",
            "reason": "deleting needs approval",
            "subject": "alice@example.com",
            "status": status,
            "requested_at": "2026-03-01T12:00:00Z",
            "expires_at": "2026-03-01T12:10:00Z",
            "decided_by": "bob@example.com",
            "something_new": true
        }))
        .unwrap()
    }

    #[test]
    fn deciding_needs_an_id_and_who_decides() {
        let a = parse(&["A1", "--by", "bob@example.com"]).unwrap();
        assert_eq!(
            (a.id.as_deref(), a.by.as_deref(), a.reject),
            (Some("A1"), Some("bob@example.com"), false)
        );
        assert!(parse(&["A1", "--by", "bob", "--reject"]).unwrap().reject);
        for bad in [
            &[][..],
            &["A1"],
            &["--by", "bob"],
            &["--reject"],
            &["A1", "--by", "bob", "--pending"],
            &["--json"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let a = parse(&["--pending", "--json"]).unwrap();
        assert!(a.pending && a.json && a.id.is_none());
    }

    #[test]
    fn requests_go_to_the_approval() {
        let req = decide_request("A1", "bob", false);
        assert_eq!(req.path, "/v1/approvals/A1/approve");
        assert_eq!(
            serde_json::from_slice::<Value>(req.body.as_ref().unwrap()).unwrap(),
            serde_json::json!({"approved_by": "bob"})
        );
        let req = decide_request("a/b", "carol", true);
        assert_eq!(req.path, "/v1/approvals/a%2Fb/reject");
        assert_eq!(
            serde_json::from_slice::<Value>(req.body.as_ref().unwrap()).unwrap(),
            serde_json::json!({"rejected_by": "carol"})
        );
        let req = pending_request();
        assert_eq!(req.path, "/v1/approvals");
        assert_eq!(req.query[0], ("status", "pending".to_owned()));
    }

    #[test]
    fn pending_approvals_render_as_a_table() {
        assert_eq!(
            pending_table(&[approval("pending")]),
            "ID                                    AGENT           ACTION                                   REASON                   SUBJECT            REQUESTED             EXPIRES\n\
             01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b  agent/research  mcp tools/call delete_file on tool:8080  deleting needs approval  alice@example.com  2026-03-01T12:00:00Z  2026-03-01T12:10:00Z\n"
        );
    }

    #[test]
    fn the_decision_is_spelled_out() {
        let text = decided_text(&approval("approved"));
        assert!(
            text.starts_with("approved 01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b for agent/research: mcp tools/call delete_file"),
            "{text}"
        );
        assert!(text.contains("on behalf of: alice@example.com"), "{text}");
        assert!(text.contains("once, until 2026-03-01T12:10:00Z"), "{text}");
        let text = decided_text(&approval("rejected"));
        assert!(text.starts_with("rejected "), "{text}");
        assert!(text.contains("will be refused"), "{text}");
    }
}
