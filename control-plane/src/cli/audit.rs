//! `mandate audit query`: the decisions sidecars reported, through `GET /v1/decisions`; `mandate
//! audit verify|export|tail`: the hash-chained audit log, through `GET /v1/audit/verify` and
//! `GET /v1/audit/records` (and `verify --file`: an export, offline, with the CA certificate).

use std::io::{BufRead as _, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use mandate_wire::DecisionRecord;
use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::client::{ApiRequest, Client, ServerArgs};
use super::table::{Table, or_dash, short_id};
use mandate_control_plane::api::audit::{AuditPage, VerifyReport};
use mandate_control_plane::audit::{Entry, TrustKeys, Verifier};

/// Arguments of `mandate audit`: the server options and a verb.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Where the control plane is.
    #[command(flatten)]
    pub server: ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `mandate audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Search the recorded decisions, newest first.
    Query(QueryArgs),
    /// Verify the audit log's hash chain and signed checkpoints (the server's, or an export's
    /// offline with --file and --ca-cert); names the first record altered, inserted or removed.
    Verify(VerifyArgs),
    /// Write the audit log as JSON lines (records with seq, prev_hash and hash, and the signed
    /// checkpoints), for `mandate audit verify --file`.
    Export(ExportArgs),
    /// Print decisions as they are recorded, until interrupted.
    Tail(TailArgs),
}

/// Arguments of `mandate audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Verify this export (`mandate audit export`) offline, against the CA certificate given
    /// with --ca-cert, instead of the server's log.
    #[arg(long, value_name = "EXPORT")]
    pub file: Option<PathBuf>,
}

/// Arguments of `mandate audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// From the first record of a decision taken at this time or later: RFC 3339, or a duration
    /// ago such as 15m, 2h or 7d [default: the whole log].
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_since, conflicts_with = "from_seq")]
    pub since: Option<String>,
    /// From this sequence number.
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..))]
    pub from_seq: Option<u64>,
}

/// Arguments of `mandate audit tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Start at this sequence number [default: only decisions recorded from now on].
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..))]
    pub from_seq: Option<u64>,
    /// Print each chained record as a JSON line instead of table lines.
    #[arg(long)]
    pub json: bool,
}

/// The verdict to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verdict {
    /// Allowed calls.
    Allow,
    /// Denied calls.
    Deny,
}

/// Arguments of `mandate audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Only calls made by this agent (its name or SPIFFE ID).
    #[arg(long, value_name = "NAME|ID")]
    pub agent: Option<String>,
    /// Only calls made on behalf of this person.
    #[arg(long, value_name = "SUBJECT")]
    pub subject: Option<String>,
    /// Only MCP calls of this tool.
    #[arg(long, value_name = "TOOL")]
    pub tool: Option<String>,
    /// Only calls made under this grant (its id).
    #[arg(long, value_name = "ID")]
    pub grant: Option<String>,
    /// Only calls a person approved, by who approved them.
    #[arg(long, value_name = "WHO")]
    pub approver: Option<String>,
    /// Only allowed or only denied calls.
    #[arg(long, value_enum, value_name = "RESULT")]
    pub result: Option<Verdict>,
    /// From this time: RFC 3339, or a duration ago such as 15m, 2h or 7d.
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_since)]
    pub since: Option<String>,
    /// Until this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_until)]
    pub until: Option<String>,
    /// At most N records [default: the server's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Print the records as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `{decisions: [..]}`.
#[derive(Debug, Deserialize)]
struct Decisions {
    decisions: Vec<Value>,
}

/// Parses `--since`: an RFC 3339 time, or a duration meaning that long before now.
pub fn parse_since(s: &str) -> Result<String, String> {
    parse_since_at(s, OffsetDateTime::now_utc())
}

/// [`parse_since`] with an explicit `now`.
pub fn parse_since_at(s: &str, now: OffsetDateTime) -> Result<String, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return utc(t);
    }
    let d = s.trim();
    let d = d
        .strip_suffix("-ago")
        .or_else(|| d.strip_suffix(" ago"))
        .unwrap_or(d);
    let ago: Duration = humantime::parse_duration(d.trim()).map_err(|_| {
        format!(
            "{s:?} is neither an RFC 3339 time (2026-01-31T09:00:00Z) nor a duration such as 15m, 2h or 7d"
        )
    })?;
    let since = time::Duration::try_from(ago)
        .ok()
        .and_then(|ago| now.checked_sub(ago))
        .ok_or_else(|| format!("{s:?} reaches back before any representable time"))?;
    utc(since.replace_nanosecond(0).unwrap_or(since))
}

/// Parses `--until`: an RFC 3339 time.
pub fn parse_until(s: &str) -> Result<String, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time such as 2026-01-31T09:00:00Z: {e}"))?;
    utc(t)
}

/// The time in UTC, RFC 3339 (`…Z`), as the server compares it.
fn utc(t: OffsetDateTime) -> Result<String, String> {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(|e| format!("cannot format the time: {e}"))
}

/// The API request for the filters given.
pub fn request(q: &QueryArgs) -> ApiRequest {
    let mut req = ApiRequest::get("/v1/decisions");
    let filters = [
        ("agent", q.agent.clone()),
        ("subject", q.subject.clone()),
        ("tool", q.tool.clone()),
        ("grant", q.grant.clone()),
        ("approver", q.approver.clone()),
        (
            "result",
            q.result.map(|r| {
                match r {
                    Verdict::Allow => "allow",
                    Verdict::Deny => "deny",
                }
                .to_owned()
            }),
        ),
        ("since", q.since.clone()),
        ("until", q.until.clone()),
        ("limit", q.limit.map(|l| l.to_string())),
    ];
    for (key, value) in filters {
        if let Some(v) = value {
            req = req.query(key, v);
        }
    }
    req
}

/// Runs `mandate audit …`.
pub fn main(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let q = match &args.command {
        AuditCommand::Query(q) => q,
        AuditCommand::Verify(v) => return verify(&args.server, v),
        AuditCommand::Export(e) => return export(&args.server, e),
        AuditCommand::Tail(t) => return tail(&args.server, t),
    };
    let client = Client::from_args(&args.server)?;
    super::block_on(async {
        let answer: Decisions = client.call(&request(q)).await?;
        let out = &mut std::io::stdout().lock();
        if q.json {
            for record in &answer.decisions {
                writeln!(out, "{}", serde_json::to_string(record)?)?;
            }
        } else {
            let records = answer
                .decisions
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<Vec<DecisionRecord>, _>>()
                .context("the server's answer holds a record that is not a decision record")?;
            write!(out, "{}", table(&records))?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// How often `mandate audit tail` asks for new records.
const TAIL_POLL: Duration = Duration::from_millis(500);
/// Records per `GET /v1/audit/records` page.
const PAGE: u32 = 5_000;

fn verify(server: &ServerArgs, v: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let Some(file) = &v.file else {
        let client = Client::from_args(server)?;
        let report: VerifyReport = super::block_on(async {
            Ok(client.call(&ApiRequest::get("/v1/audit/verify")).await?)
        })?;
        return Ok(if report.ok {
            println!("{}", report.summary);
            ExitCode::SUCCESS
        } else {
            eprintln!("{}", report.summary);
            ExitCode::FAILURE
        });
    };
    let ca = server.ca_cert.as_ref().context(
        "verifying an export needs the control plane's CA certificate: give --ca-cert FILE",
    )?;
    let pem = std::fs::read_to_string(ca)
        .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
    let keys = TrustKeys::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    match verify_lines(keys, reader.lines()) {
        Ok(summary) => {
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            eprintln!("{}: audit chain broken: {why}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Verifies the lines of an export; the summary, or where it breaks.
pub fn verify_lines(
    keys: TrustKeys,
    lines: impl Iterator<Item = std::io::Result<String>>,
) -> Result<String, String> {
    let mut verifier: Option<Verifier> = None;
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("reading line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| format!("line {} is not an audit export entry: {e}", n + 1))?;
        let v = verifier.get_or_insert_with(|| {
            let first = match &entry {
                Entry::Record(r) => r.seq,
                Entry::Checkpoint(c) => c.seq + 1,
            };
            Verifier::starting_at(keys.clone(), first)
        });
        v.entry(&entry).map_err(|f| f.message)?;
    }
    let v = verifier.unwrap_or_else(|| Verifier::new(keys));
    Ok(v.summary())
}

fn export(server: &ServerArgs, e: &ExportArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_args(server)?;
    super::block_on(async {
        let out = &mut std::io::BufWriter::new(std::io::stdout().lock());
        let mut req = ApiRequest::get("/v1/audit/records").query("limit", PAGE.to_string());
        req = match (&e.since, e.from_seq) {
            (Some(since), _) => req.query("since", since.clone()),
            (None, seq) => req.query("from_seq", seq.unwrap_or(1).to_string()),
        };
        loop {
            let page: AuditPage = client.call(&req).await?;
            for entry in &page.entries {
                writeln!(out, "{}", serde_json::to_string(entry)?)?;
            }
            if !page.entries.iter().any(|e| matches!(e, Entry::Record(_))) {
                break;
            }
            req = ApiRequest::get("/v1/audit/records")
                .query("limit", PAGE.to_string())
                .query("from_seq", page.next_seq.to_string());
        }
        out.flush()?;
        Ok(ExitCode::SUCCESS)
    })
}

fn tail(server: &ServerArgs, t: &TailArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_args(server)?;
    super::block_on(async {
        let mut from = match t.from_seq {
            Some(seq) => seq,
            None => {
                let req = ApiRequest::get("/v1/audit/records")
                    .query("limit", "1")
                    .query("from_seq", i64::MAX.to_string());
                let page: AuditPage = client.call(&req).await?;
                page.head.seq + 1
            }
        };
        let mut header = !t.json;
        let mut failing = false;
        loop {
            let req = ApiRequest::get("/v1/audit/records")
                .query("limit", PAGE.to_string())
                .query("from_seq", from.to_string());
            match client.call::<AuditPage>(&req).await {
                Ok(page) => {
                    failing = false;
                    let out = &mut std::io::stdout().lock();
                    let records: Vec<_> = page
                        .entries
                        .into_iter()
                        .filter_map(|e| match e {
                            Entry::Record(r) => Some(r),
                            Entry::Checkpoint(_) => None,
                        })
                        .collect();
                    if !records.is_empty() {
                        from = page.next_seq;
                        if t.json {
                            for r in &records {
                                writeln!(out, "{}", serde_json::to_string(r)?)?;
                            }
                        } else {
                            let decisions: Vec<DecisionRecord> = records
                                .into_iter()
                                .filter_map(|r| serde_json::from_value(r.record).ok())
                                .collect();
                            let text = table(&decisions);
                            let skip = usize::from(!header);
                            for line in text.lines().skip(skip) {
                                writeln!(out, "{line}")?;
                            }
                            header = false;
                        }
                        out.flush()?;
                        continue;
                    }
                }
                Err(e) => {
                    if !failing {
                        eprintln!("mandate audit tail: {e} (retrying)");
                    }
                    failing = true;
                }
            }
            tokio::time::sleep(TAIL_POLL).await;
        }
    })
}

/// What was called: `METHOD /path`, `mcp tools/call TOOL`, or `tcp`.
fn call(r: &DecisionRecord) -> String {
    if let Some(mcp) = &r.mcp {
        let parts: Vec<&str> = [mcp.method.as_deref(), mcp.name.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        return format!("mcp {}", parts.join(" "));
    }
    match (&r.method, &r.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        (Some(m), None) => m.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => "tcp".to_owned(),
    }
}

/// `TIME  RESULT  SOURCE  SUBJECT  GRANT  APPROVER  DESTINATION  CALL  REASON  POLICY`: which
/// agent made the call, on whose behalf, under which grant, who approved it and which policy
/// version decided.
pub fn table(records: &[DecisionRecord]) -> String {
    let mut t = Table::new(&[
        "TIME",
        "RESULT",
        "SOURCE",
        "SUBJECT",
        "GRANT",
        "APPROVER",
        "DESTINATION",
        "CALL",
        "REASON",
        "POLICY",
    ]);
    for r in records {
        let verdict = if r.allow { "allow" } else { "deny" };
        t.row([
            r.timestamp.clone(),
            if r.enforced {
                verdict.to_owned()
            } else {
                format!("{verdict} (dry-run)")
            },
            short_id(&r.source).to_owned(),
            or_dash(r.delegation.as_ref().map(|d| &d.subject)),
            or_dash(r.delegation.as_ref().map(|d| &d.grant_id)),
            or_dash(r.approval.as_ref().map(|a| &a.approved_by)),
            format!("{}:{}", r.destination.host, r.destination.port),
            call(r),
            r.reason.clone(),
            or_dash(r.policy_version.as_ref()),
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
        q: QueryArgs,
    }

    fn parse(args: &[&str]) -> Result<QueryArgs, clap::Error> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        P::try_parse_from(argv).map(|p| p.q)
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-03-01T12:00:00.5Z", &Rfc3339).unwrap()
    }

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        assert_eq!(
            parse_since_at("15m", now()).unwrap(),
            "2026-03-01T11:45:00Z"
        );
        assert_eq!(
            parse_since_at("2h ago", now()).unwrap(),
            "2026-03-01T10:00:00Z"
        );
        assert_eq!(
            parse_since_at("1d-ago", now()).unwrap(),
            "2026-02-28T12:00:00Z"
        );
        assert_eq!(
            parse_since_at("2026-03-01T09:00:00+02:00", now()).unwrap(),
            "2026-03-01T07:00:00Z"
        );
        assert_eq!(
            parse_since_at("2026-03-01T09:00:00.25Z", now()).unwrap(),
            "2026-03-01T09:00:00.25Z"
        );
        let err = parse_since_at("yesterday", now()).unwrap_err();
        assert!(err.contains("RFC 3339") && err.contains("15m"), "{err}");
        assert!(parse_since_at("100000000000d", now()).is_err());
    }

    #[test]
    fn until_takes_only_a_time() {
        assert_eq!(
            parse_until("2026-03-01T09:00:00-01:00").unwrap(),
            "2026-03-01T10:00:00Z"
        );
        assert!(parse_until("15m").is_err());
    }

    #[test]
    fn filters_become_query_parameters() {
        let q = parse(&[
            "--agent",
            "research",
            "--subject",
            "alice@example.com",
            "--tool",
            "search",
            "--grant",
            "g1",
            "--approver",
            "bob@example.com",
            "--result",
            "deny",
            "--since",
            "2026-03-01T00:00:00Z",
            "--until",
            "2026-03-02T00:00:00Z",
            "--limit",
            "10",
        ])
        .unwrap();
        let req = request(&q);
        assert_eq!(req.path, "/v1/decisions");
        let pairs: Vec<(&str, &str)> = req.query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("agent", "research"),
                ("subject", "alice@example.com"),
                ("tool", "search"),
                ("grant", "g1"),
                ("approver", "bob@example.com"),
                ("result", "deny"),
                ("since", "2026-03-01T00:00:00Z"),
                ("until", "2026-03-02T00:00:00Z"),
                ("limit", "10"),
            ]
        );
        let q = parse(&["--json"]).unwrap();
        assert!(q.json && request(&q).query.is_empty());
    }

    #[test]
    fn bad_filters_are_refused_before_any_request() {
        assert!(parse(&["--result", "maybe"]).is_err());
        assert!(parse(&["--limit", "0"]).is_err());
        assert!(parse(&["--since", "soon"]).is_err());
    }

    fn record(extra: Value) -> DecisionRecord {
        let mut v = serde_json::json!({
            "decision_id": "0190", "timestamp": "2026-03-01T12:00:00Z", "direction": "outbound",
            "source": "spiffe://mandate.local/agent/research",
            "destination": {"host": "tool", "port": 8080}, "allow": false, "enforced": true,
            "reason": "not in ceiling", "eval_us": 12, "sidecar": "s1"
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn records_render_with_their_call_and_policy() {
        let http = record(
            serde_json::json!({"method": "GET", "path": "/v1/x", "allow": true,
            "reason": "ok", "policy_version": "3"}),
        );
        let mcp = record(serde_json::json!({"method": "POST", "path": "/mcp",
            "mcp": {"method": "tools/call", "name": "search"}, "enforced": false,
            "delegation": {"subject": "alice", "grant_id": "g1", "actors": []},
            "approval": {"id": "a1", "approved_by": "bob"}}));
        let tcp = record(serde_json::json!({"reason": "db\u{1b}"}));
        assert_eq!(
            table(&[http, mcp, tcp]),
            "TIME                  RESULT          SOURCE          SUBJECT  GRANT  APPROVER  DESTINATION  CALL                   REASON          POLICY\n\
             2026-03-01T12:00:00Z  allow           agent/research  -        -      -         tool:8080    GET /v1/x              ok              3\n\
             2026-03-01T12:00:00Z  deny (dry-run)  agent/research  alice    g1     bob       tool:8080    mcp tools/call search  not in ceiling  -\n\
             2026-03-01T12:00:00Z  deny            agent/research  -        -      -         tool:8080    tcp                    db\\u{1b}        -\n"
        );
    }
}
