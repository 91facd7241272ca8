//! `mandate-proxy init-iptables` and `clean-iptables`: the nat rules that send a pod's TCP
//! through its sidecar.
//!
//! [`plan`] turns validated [`Options`] into the rules of each IP family, rendered in
//! `iptables-restore` format. A [`Script`] is the exact list of commands that installs (or
//! removes) them: run as is, or printed as a POSIX shell script by `--dry-run`. It runs once at
//! pod start, before any async runtime, so commands run with `std::process`.
//!
//! Init fills the chains MANDATE_INBOUND and MANDATE_OUTPUT with one `iptables-restore
//! --noflush` per family (declaring a chain creates or empties it, so the chains change
//! atomically), then adds the jumps from PREROUTING and OUTPUT unless they are there: running it
//! twice leaves one set of rules. Clean declares the chains (so it works when nothing is
//! installed), deletes every copy of the jumps and deletes the chains.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Output, Stdio};
use std::str::FromStr;

/// The sidecar's default uid, whose own traffic is never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// An unusable flag, or a command that could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// A flag has an unusable value.
    #[error("{flag}: {why}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`: {error} (is iptables installed? apt-get install iptables)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it did not start.
        error: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}; {hint}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said (trimmed).
        stderr: String,
        /// What to do about it.
        hint: &'static str,
    },
}

/// Flags of `mandate-proxy init-iptables`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The sidecar's uid: its own traffic is never redirected.
    #[arg(long, value_name = "UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Also never redirect the traffic of processes with this gid.
    #[arg(long, value_name = "GID")]
    pub proxy_gid: Option<u32>,
    /// Where the pod's outbound TCP is redirected: the port of the sidecar's --outbound.
    #[arg(long, value_name = "PORT", default_value_t = 15001, value_parser = port)]
    pub outbound_port: u16,
    /// Where the pod's inbound TCP is redirected: the port of the sidecar's --inbound.
    #[arg(long, value_name = "PORT", default_value_t = 15006, value_parser = port)]
    pub inbound_port: u16,
    /// Inbound destination ports left alone, e.g. 15000 for kubelet probes and scraping.
    #[arg(long, value_name = "PORT,...", value_delimiter = ',', value_parser = port)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    #[arg(long, value_name = "PORT,...", value_delimiter = ',', value_parser = port)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone, e.g. 10.0.0.0/8 (IPv6 blocks need --ipv6).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also install the same rules with ip6tables.
    #[arg(long)]
    pub ipv6: bool,
    /// Print the commands and rules that would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Flags of `mandate-proxy clean-iptables`.
#[derive(Debug, Clone, clap::Args)]
pub struct CleanArgs {
    /// Also remove the ip6tables rules.
    #[arg(long)]
    pub ipv6: bool,
    /// Print the commands that would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `mandate-proxy init-iptables`: installs the rules, or with `--dry-run` returns the script
/// that would. Returns what to print on stdout.
pub fn init(args: &InitArgs) -> Result<String, IptablesError> {
    let options = Options::new(args)?;
    for warning in options.warnings() {
        eprintln!("mandate-proxy: warning: {warning}");
    }
    let script = Script::init(&plan(&options));
    if args.dry_run {
        return Ok(script.dry_run("init-iptables"));
    }
    script.run(&mut System)?;
    Ok(format!(
        "installed nat chains {} (from {}, TCP to port {}) and {} (from {}, TCP to port {}) for {}\n",
        Chain::Inbound.name(),
        Chain::Inbound.hook(),
        options.inbound_port,
        Chain::Output.name(),
        Chain::Output.hook(),
        options.outbound_port,
        Family::names(&options.families()),
    ))
}

/// `mandate-proxy clean-iptables`: removes what init installed (nothing installed is fine), or
/// with `--dry-run` returns the script that would. Returns what to print on stdout.
pub fn clean(args: &CleanArgs) -> Result<String, IptablesError> {
    let families = Family::selected(args.ipv6);
    let script = Script::clean(&families);
    if args.dry_run {
        return Ok(script.dry_run("clean-iptables"));
    }
    script.run(&mut System)?;
    Ok(format!(
        "removed nat chains {} and {} and their jumps for {}\n",
        Chain::Inbound.name(),
        Chain::Output.name(),
        Family::names(&families),
    ))
}

/// clap parser of a port flag: 1-65535.
fn port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} is not a port: give 1-65535"))
}

/// An address block, `ADDR/PREFIX`; a bare address is the block of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Refuses host bits past the prefix: `10.1.0.0/8` may be a typo for `/16`, and excluding
    /// more than meant would let traffic bypass the sidecar.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not an address block: give ADDR/PREFIX, e.g. 10.0.0.0/8 or fd00::/8")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{max}"))?,
        };
        let network = network(addr, prefix);
        if network != addr {
            return Err(format!(
                "{s:?} has address bits set past its /{prefix} prefix; did you mean {network}/{prefix}?"
            ));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `addr` with every bit past the first `prefix` cleared.
fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

/// What init-iptables installs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    proxy_uid: u32,
    proxy_gid: Option<u32>,
    outbound_port: u16,
    inbound_port: u16,
    exclude_inbound_ports: BTreeSet<u16>,
    exclude_outbound_ports: BTreeSet<u16>,
    exclude_outbound_cidrs: BTreeSet<Cidr>,
    ipv6: bool,
}

impl Options {
    /// Validates the flags together; every error names the flag to fix.
    pub fn new(args: &InitArgs) -> Result<Self, IptablesError> {
        let invalid = |flag, why: String| IptablesError::Invalid { flag, why };
        if args.outbound_port == args.inbound_port {
            return Err(invalid(
                "--outbound-port",
                format!(
                    "{} is also --inbound-port: the sidecar's outbound and inbound listeners need different ports",
                    args.outbound_port
                ),
            ));
        }
        if !args.ipv6
            && let Some(v6) = args
                .exclude_outbound_cidrs
                .iter()
                .find(|c| c.family() == Family::V6)
        {
            return Err(invalid(
                "--exclude-outbound-cidrs",
                format!(
                    "{v6} is an IPv6 block: add --ipv6 to install the IPv6 rules it belongs to"
                ),
            ));
        }
        Ok(Self {
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            exclude_inbound_ports: args.exclude_inbound_ports.iter().copied().collect(),
            exclude_outbound_ports: args.exclude_outbound_ports.iter().copied().collect(),
            exclude_outbound_cidrs: args.exclude_outbound_cidrs.iter().copied().collect(),
            ipv6: args.ipv6,
        })
    }

    /// Allowed but risky choices, to print before installing: uid or gid 0 exempts every
    /// process of root, the app's too if it runs as root.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.proxy_uid == 0 {
            warnings.push("--proxy-uid 0: no process running as root is redirected, the app's neither if it runs as root; run the sidecar as its own uid (default 1337)".to_owned());
        }
        if self.proxy_gid == Some(0) {
            warnings.push("--proxy-gid 0: no process of group root is redirected, the app's neither if it runs in group root; give the sidecar its own gid".to_owned());
        }
        warnings
    }

    fn families(&self) -> Vec<Family> {
        Family::selected(self.ipv6)
    }
}

/// An IP family, and the tools that manage its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables`.
    V4,
    /// IPv6: `ip6tables`.
    V6,
}

impl Family {
    /// IPv4, and IPv6 too when `ipv6`.
    fn selected(ipv6: bool) -> Vec<Family> {
        if ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn names(families: &[Family]) -> &'static str {
        if families.contains(&Family::V6) {
            "IPv4 and IPv6"
        } else {
            "IPv4"
        }
    }
}

/// One of the two nat chains init-iptables owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    /// MANDATE_INBOUND, jumped to from PREROUTING: TCP arriving at the pod.
    Inbound,
    /// MANDATE_OUTPUT, jumped to from OUTPUT: TCP the pod's processes open.
    Output,
}

impl Chain {
    /// Both chains, in the order they are installed.
    pub const ALL: [Chain; 2] = [Chain::Inbound, Chain::Output];

    /// The chain's name in the nat table.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Inbound => "MANDATE_INBOUND",
            Chain::Output => "MANDATE_OUTPUT",
        }
    }

    /// The built-in nat chain that jumps to it (for TCP only).
    pub fn hook(self) -> &'static str {
        match self {
            Chain::Inbound => "PREROUTING",
            Chain::Output => "OUTPUT",
        }
    }
}

/// What a rule matches (the jumps already limit the chains to TCP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Packets of processes with this uid.
    Uid(u32),
    /// Packets of processes with this gid.
    Gid(u32),
    /// Packets leaving through the loopback interface.
    Loopback,
    /// TCP to this destination port.
    Port(u16),
    /// Packets to this address block.
    Destination(Cidr),
    /// Any TCP.
    Tcp,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Leave the connection alone.
    Return,
    /// Send the connection to this local port.
    Redirect(u16),
}

/// One rule of one of our chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain it is in.
    pub chain: Chain,
    /// What it matches.
    pub when: Match,
    /// What it does.
    pub then: Target,
}

/// Renders as an `iptables-restore` line, in the form `iptables-save` prints it back.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} ", self.chain.name())?;
        match &self.when {
            Match::Uid(uid) => write!(f, "-m owner --uid-owner {uid}")?,
            Match::Gid(gid) => write!(f, "-m owner --gid-owner {gid}")?,
            Match::Loopback => write!(f, "-o lo")?,
            Match::Port(port) => write!(f, "-p tcp -m tcp --dport {port}")?,
            Match::Destination(cidr) => write!(f, "-d {cidr}")?,
            Match::Tcp => write!(f, "-p tcp")?,
        }
        match self.then {
            Target::Return => write!(f, " -j RETURN"),
            Target::Redirect(port) => write!(f, " -j REDIRECT --to-ports {port}"),
        }
    }
}

/// The nat rules of one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The family.
    pub family: Family,
    /// The rules of both chains, in order.
    pub rules: Vec<Rule>,
}

impl Table {
    /// The `iptables-restore --noflush` input that declares (creates or empties) both chains
    /// and fills them.
    pub fn restore_input(&self) -> String {
        let mut text = declare_chains();
        for rule in &self.rules {
            text.push_str(&format!("{rule}\n"));
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// `*nat` and both chains' declarations: under `--noflush`, a declared chain is created if
/// missing and emptied if present.
fn declare_chains() -> String {
    let mut text = String::from("*nat\n");
    for chain in Chain::ALL {
        text.push_str(&format!(":{} - [0:0]\n", chain.name()));
    }
    text
}

/// Everything init-iptables installs besides the jumps: one table per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// IPv4, then IPv6 when asked for.
    pub tables: Vec<Table>,
}

/// The rules for `options`; pure.
///
/// Inbound: RETURN for the inbound port itself and the excluded inbound ports, then REDIRECT to
/// the inbound port. Outbound: RETURN for the proxy's uid (and gid), for loopback, for the
/// excluded ports and address blocks, then REDIRECT to the outbound port.
pub fn plan(options: &Options) -> Plan {
    let tables = options
        .families()
        .into_iter()
        .map(|family| Table {
            family,
            rules: rules(options, family),
        })
        .collect();
    Plan { tables }
}

fn rules(o: &Options, family: Family) -> Vec<Rule> {
    let inbound = |when, then| Rule {
        chain: Chain::Inbound,
        when,
        then,
    };
    let outbound = |when, then| Rule {
        chain: Chain::Output,
        when,
        then,
    };
    let inbound_kept: BTreeSet<u16> = std::iter::once(o.inbound_port)
        .chain(o.exclude_inbound_ports.iter().copied())
        .collect();
    let mut rules: Vec<Rule> = inbound_kept
        .into_iter()
        .map(|port| inbound(Match::Port(port), Target::Return))
        .collect();
    rules.push(inbound(Match::Tcp, Target::Redirect(o.inbound_port)));
    rules.push(outbound(Match::Uid(o.proxy_uid), Target::Return));
    rules.extend(
        o.proxy_gid
            .map(|gid| outbound(Match::Gid(gid), Target::Return)),
    );
    rules.push(outbound(Match::Loopback, Target::Return));
    rules.extend(
        o.exclude_outbound_ports
            .iter()
            .map(|port| outbound(Match::Port(*port), Target::Return)),
    );
    rules.extend(
        o.exclude_outbound_cidrs
            .iter()
            .filter(|cidr| cidr.family() == family)
            .map(|cidr| outbound(Match::Destination(*cidr), Target::Return)),
    );
    rules.push(outbound(Match::Tcp, Target::Redirect(o.outbound_port)));
    rules
}

/// A command line; every argument is a plain word, so it prints as valid shell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cmd {
    program: &'static str,
    args: Vec<String>,
}

impl Cmd {
    /// `iptables-restore --noflush`: leaves every chain it does not declare alone.
    fn restore(family: Family) -> Self {
        Self {
            program: family.restore(),
            args: vec!["--noflush".into()],
        }
    }

    /// `iptables -t nat OP HOOK -p tcp -j CHAIN`: check (`-C`), insert (`-I`) or delete (`-D`)
    /// the chain's jump.
    fn jump(family: Family, op: &str, chain: Chain) -> Self {
        Self {
            program: family.iptables(),
            args: [
                "-t",
                "nat",
                op,
                chain.hook(),
                "-p",
                "tcp",
                "-j",
                chain.name(),
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        self.args.iter().try_for_each(|a| write!(f, " {a}"))
    }
}

/// One step of init or clean.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Feed `input` to `iptables-restore --noflush`: all of it or nothing, for the table.
    Restore { family: Family, input: String },
    /// Insert the chain's jump at the top of its hook unless it is there (`-C`, then `-I`).
    AddJump { family: Family, chain: Chain },
    /// Delete every copy of the chain's jump (`-D` until there is none).
    RemoveJumps { family: Family, chain: Chain },
}

/// The commands that install or remove the rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    steps: Vec<Step>,
}

impl Script {
    /// Per family: fill the chains in one restore, then add the jumps that are missing.
    pub fn init(plan: &Plan) -> Self {
        let mut steps = Vec::new();
        for table in &plan.tables {
            steps.push(Step::Restore {
                family: table.family,
                input: table.restore_input(),
            });
            steps.extend(Chain::ALL.map(|chain| Step::AddJump {
                family: table.family,
                chain,
            }));
        }
        Self { steps }
    }

    /// Per family: declare the chains (so the rest works whether or not they exist), delete
    /// every jump to them, then delete them in one restore.
    pub fn clean(families: &[Family]) -> Self {
        let mut steps = Vec::new();
        for &family in families {
            steps.push(Step::Restore {
                family,
                input: format!("{}COMMIT\n", declare_chains()),
            });
            steps.extend(Chain::ALL.map(|chain| Step::RemoveJumps { family, chain }));
            let mut delete = String::from("*nat\n");
            for chain in Chain::ALL {
                delete.push_str(&format!("-X {}\n", chain.name()));
            }
            delete.push_str("COMMIT\n");
            steps.push(Step::Restore {
                family,
                input: delete,
            });
        }
        Self { steps }
    }

    /// The script as POSIX shell, exactly the commands [`Script::run`] runs; `verb` names the
    /// subcommand in the leading comment.
    pub fn dry_run(&self, verb: &str) -> String {
        let mut text = format!(
            "# mandate-proxy {verb} --dry-run: nothing was changed; these commands would run\nset -e\n"
        );
        for step in &self.steps {
            match step {
                Step::Restore { family, input } => {
                    text.push_str(&format!("{} <<'EOF'\n{input}EOF\n", Cmd::restore(*family)));
                }
                Step::AddJump { family, chain } => text.push_str(&format!(
                    "{} 2>/dev/null || {}\n",
                    Cmd::jump(*family, "-C", *chain),
                    Cmd::jump(*family, "-I", *chain),
                )),
                Step::RemoveJumps { family, chain } => text.push_str(&format!(
                    "while {} 2>/dev/null; do :; done\n",
                    Cmd::jump(*family, "-D", *chain),
                )),
            }
        }
        text
    }

    /// Runs the steps in order, stopping at the first failure.
    ///
    /// `-C` and `-D` exit 1 when the rule is not there (the chain exists by then); any other
    /// failure is an error.
    fn run(&self, runner: &mut dyn Runner) -> Result<(), IptablesError> {
        for step in &self.steps {
            match step {
                Step::Restore { family, input } => {
                    succeed(runner, &Cmd::restore(*family), Some(input))?;
                }
                Step::AddJump { family, chain } => {
                    let check = Cmd::jump(*family, "-C", *chain);
                    if absent(runner, &check)? {
                        succeed(runner, &Cmd::jump(*family, "-I", *chain), None)?;
                    }
                }
                Step::RemoveJumps { family, chain } => {
                    let delete = Cmd::jump(*family, "-D", *chain);
                    while !absent(runner, &delete)? {}
                }
            }
        }
        Ok(())
    }
}

/// Runs commands: [`System`] really, tests with canned answers.
trait Runner {
    /// Runs `cmd` to completion, `input` on its stdin.
    fn run(&mut self, cmd: &Cmd, input: Option<&str>) -> std::io::Result<Output>;
}

/// Runs commands as child processes.
struct System;

impl Runner for System {
    fn run(&mut self, cmd: &Cmd, input: Option<&str>) -> std::io::Result<Output> {
        let mut child = Command::new(cmd.program)
            .args(&cmd.args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    }
}

/// Runs `cmd`; an error unless it exits 0.
fn succeed(runner: &mut dyn Runner, cmd: &Cmd, input: Option<&str>) -> Result<(), IptablesError> {
    let out = spawn(runner, cmd, input)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(cmd, &out))
    }
}

/// Runs a `-C` or `-D` of a rule: whether the rule was absent (exit 1); an error unless 0 or 1.
fn absent(runner: &mut dyn Runner, cmd: &Cmd) -> Result<bool, IptablesError> {
    let out = spawn(runner, cmd, None)?;
    match out.status.code() {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        _ => Err(failed(cmd, &out)),
    }
}

fn spawn(runner: &mut dyn Runner, cmd: &Cmd, input: Option<&str>) -> Result<Output, IptablesError> {
    runner
        .run(cmd, input)
        .map_err(|error| IptablesError::Spawn {
            command: cmd.to_string(),
            error,
        })
}

/// The error for `cmd` exiting non-zero: its stderr on one line (without iptables' "Try
/// `iptables -h'" advice) and what to do, told by what it said.
fn failed(cmd: &Cmd, out: &Output) -> IptablesError {
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("Try `"))
        .collect::<Vec<_>>()
        .join(" / ");
    let says = |phrases: &[&str]| phrases.iter().any(|p| stderr.contains(p));
    let hint = if says(&[
        "Permission denied",
        "Operation not permitted",
        "must be root",
        "initialize table",
        "can't initialize",
    ]) {
        "it needs root or the NET_ADMIN capability (and NET_RAW for iptables-legacy) in the pod's network namespace, and a kernel with the nat table; Kubernetes: securityContext.capabilities.add: [NET_ADMIN, NET_RAW]"
    } else if says(&["busy", "Too many links"]) {
        "another rule still jumps to the chain: find it with `iptables-save -t nat`, delete it, and run clean-iptables again"
    } else {
        "`iptables-save -t nat` shows the rules as they are, `--dry-run` every command and its input; running again is safe"
    };
    IptablesError::Failed {
        command: cmd.to_string(),
        status: out.status,
        stderr,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    use clap::Parser;

    use super::*;

    /// `init-iptables` and its flags, as the binary parses them.
    #[derive(Parser)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }

    fn args(flags: &[&str]) -> Result<InitArgs, String> {
        Init::try_parse_from(std::iter::once("init-iptables").chain(flags.iter().copied()))
            .map(|i| i.args)
            .map_err(|e| e.to_string())
    }

    fn options(flags: &[&str]) -> Result<Options, String> {
        Options::new(&args(flags)?).map_err(|e| e.to_string())
    }

    fn rules_of(flags: &[&str]) -> Vec<Vec<String>> {
        plan(&options(flags).unwrap())
            .tables
            .iter()
            .map(|t| t.rules.iter().map(Rule::to_string).collect())
            .collect()
    }

    #[test]
    fn defaults_redirect_inbound_to_15006_and_outbound_to_15001_except_uid_1337_and_loopback() {
        let plan = plan(&options(&[]).unwrap());
        assert_eq!(plan.tables.len(), 1, "IPv4 only without --ipv6");
        assert_eq!(plan.tables[0].family, Family::V4);
        assert_eq!(
            plan.tables[0].restore_input(),
            "*nat\n\
             :MANDATE_INBOUND - [0:0]\n\
             :MANDATE_OUTPUT - [0:0]\n\
             -A MANDATE_INBOUND -p tcp -m tcp --dport 15006 -j RETURN\n\
             -A MANDATE_INBOUND -p tcp -j REDIRECT --to-ports 15006\n\
             -A MANDATE_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A MANDATE_OUTPUT -o lo -j RETURN\n\
             -A MANDATE_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
             COMMIT\n"
        );
    }

    #[test]
    fn exclusions_return_before_the_redirect_sorted_and_once_each() {
        let rules = rules_of(&[
            "--exclude-inbound-ports",
            "15020,15000,15006",
            "--exclude-inbound-ports",
            "15000",
            "--exclude-outbound-ports",
            "5432,443",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,10.0.0.0/8",
            "--outbound-port",
            "16001",
            "--inbound-port",
            "16006",
        ]);
        assert_eq!(
            rules,
            vec![vec![
                "-A MANDATE_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A MANDATE_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A MANDATE_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MANDATE_INBOUND -p tcp -m tcp --dport 16006 -j RETURN",
                "-A MANDATE_INBOUND -p tcp -j REDIRECT --to-ports 16006",
                "-A MANDATE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MANDATE_OUTPUT -o lo -j RETURN",
                "-A MANDATE_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
                "-A MANDATE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
                "-A MANDATE_OUTPUT -d 10.0.0.0/8 -j RETURN",
                "-A MANDATE_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A MANDATE_OUTPUT -p tcp -j REDIRECT --to-ports 16001",
            ]]
        );
    }

    #[test]
    fn a_proxy_gid_is_exempt_too_right_after_the_uid() {
        let rules = rules_of(&["--proxy-uid", "2000", "--proxy-gid", "3000"]);
        assert_eq!(
            rules[0][2..5],
            [
                "-A MANDATE_OUTPUT -m owner --uid-owner 2000 -j RETURN",
                "-A MANDATE_OUTPUT -m owner --gid-owner 3000 -j RETURN",
                "-A MANDATE_OUTPUT -o lo -j RETURN",
            ]
        );
    }

    #[test]
    fn ipv6_adds_an_ip6tables_table_and_each_family_gets_only_its_own_blocks() {
        let plan = plan(
            &options(&[
                "--ipv6",
                "--exclude-outbound-cidrs",
                "10.0.0.0/8,fd00::/8,192.168.1.7",
            ])
            .unwrap(),
        );
        let families: Vec<Family> = plan.tables.iter().map(|t| t.family).collect();
        assert_eq!(families, [Family::V4, Family::V6]);
        let blocks = |t: &Table| -> Vec<String> {
            t.rules
                .iter()
                .filter(|r| matches!(r.when, Match::Destination(_)))
                .map(Rule::to_string)
                .collect()
        };
        assert_eq!(
            blocks(&plan.tables[0]),
            [
                "-A MANDATE_OUTPUT -d 10.0.0.0/8 -j RETURN",
                "-A MANDATE_OUTPUT -d 192.168.1.7/32 -j RETURN",
            ]
        );
        assert_eq!(
            blocks(&plan.tables[1]),
            ["-A MANDATE_OUTPUT -d fd00::/8 -j RETURN"]
        );
        assert_eq!(
            plan.tables[0].rules.len() - 2,
            plan.tables[1].rules.len() - 1,
            "otherwise the same rules"
        );
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        for (flags, want) in [
            (vec!["--outbound-port", "0"], "--outbound-port"),
            (vec!["--inbound-port", "65536"], "--inbound-port"),
            (vec!["--inbound-port", "http"], "is not a port"),
            (
                vec!["--exclude-inbound-ports", "15000,"],
                "--exclude-inbound-ports",
            ),
            (
                vec!["--exclude-outbound-ports", "70000"],
                "--exclude-outbound-ports",
            ),
            (vec!["--proxy-uid", "nobody"], "--proxy-uid"),
            (
                vec!["--outbound-port", "15006"],
                "--outbound-port: 15006 is also --inbound-port",
            ),
            (
                vec!["--exclude-outbound-cidrs", "10.0.0.0/33"],
                "prefix length must be 0-32",
            ),
            (
                vec!["--exclude-outbound-cidrs", "10.0.0/8"],
                "is not an address block",
            ),
            (
                vec!["--exclude-outbound-cidrs", "10.1.0.0/8"],
                "did you mean 10.0.0.0/8?",
            ),
            (
                vec!["--exclude-outbound-cidrs", "fd00::/8"],
                "--exclude-outbound-cidrs: fd00::/8 is an IPv6 block: add --ipv6",
            ),
        ] {
            let err = options(&flags).unwrap_err();
            assert!(err.contains(want), "{flags:?}: {err}");
            assert!(err.contains(flags[0]), "names {}: {err}", flags[0]);
        }
    }

    #[test]
    fn root_as_the_proxy_uid_or_gid_is_allowed_with_a_warning() {
        assert_eq!(options(&[]).unwrap().warnings(), Vec::<String>::new());
        let warnings = options(&["--proxy-uid", "0", "--proxy-gid", "0"])
            .unwrap()
            .warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("--proxy-uid 0: no process running as root is redirected"));
        assert!(warnings[1].starts_with("--proxy-gid 0: no process of group root is redirected"));
    }

    #[test]
    fn init_dry_run_prints_the_restore_input_and_the_jumps_as_shell() {
        let script = Script::init(&plan(&options(&["--proxy-gid", "1337"]).unwrap()));
        assert_eq!(
            script.dry_run("init-iptables"),
            "# mandate-proxy init-iptables --dry-run: nothing was changed; these commands would run
set -e
iptables-restore --noflush <<'EOF'
*nat
:MANDATE_INBOUND - [0:0]
:MANDATE_OUTPUT - [0:0]
-A MANDATE_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A MANDATE_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A MANDATE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MANDATE_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MANDATE_OUTPUT -o lo -j RETURN
-A MANDATE_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
EOF
iptables -t nat -C PREROUTING -p tcp -j MANDATE_INBOUND 2>/dev/null || iptables -t nat -I PREROUTING -p tcp -j MANDATE_INBOUND
iptables -t nat -C OUTPUT -p tcp -j MANDATE_OUTPUT 2>/dev/null || iptables -t nat -I OUTPUT -p tcp -j MANDATE_OUTPUT
"
        );
    }

    #[test]
    fn clean_dry_run_declares_removes_every_jump_then_deletes_the_chains() {
        assert_eq!(
            Script::clean(&[Family::V6]).dry_run("clean-iptables"),
            "# mandate-proxy clean-iptables --dry-run: nothing was changed; these commands would run
set -e
ip6tables-restore --noflush <<'EOF'
*nat
:MANDATE_INBOUND - [0:0]
:MANDATE_OUTPUT - [0:0]
COMMIT
EOF
while ip6tables -t nat -D PREROUTING -p tcp -j MANDATE_INBOUND 2>/dev/null; do :; done
while ip6tables -t nat -D OUTPUT -p tcp -j MANDATE_OUTPUT 2>/dev/null; do :; done
ip6tables-restore --noflush <<'EOF'
*nat
-X MANDATE_INBOUND
-X MANDATE_OUTPUT
COMMIT
EOF
"
        );
    }

    /// Answers commands from a list of exit codes (with stderr), recording what ran.
    struct Canned {
        answers: VecDeque<(i32, &'static str)>,
        ran: Vec<String>,
    }

    impl Canned {
        fn new(answers: &[(i32, &'static str)]) -> Self {
            Self {
                answers: answers.iter().copied().collect(),
                ran: Vec::new(),
            }
        }
    }

    impl Runner for Canned {
        fn run(&mut self, cmd: &Cmd, input: Option<&str>) -> std::io::Result<Output> {
            self.ran.push(match input {
                Some(input) => format!("{cmd} < {} lines", input.lines().count()),
                None => cmd.to_string(),
            });
            let (code, stderr) = self
                .answers
                .pop_front()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))?;
            Ok(Output {
                status: ExitStatus::from_raw(code << 8),
                stdout: Vec::new(),
                stderr: stderr.as_bytes().to_vec(),
            })
        }
    }

    fn default_init() -> Script {
        Script::init(&plan(&options(&[]).unwrap()))
    }

    #[test]
    fn init_inserts_only_the_jumps_that_are_missing() {
        let mut runner = Canned::new(&[(0, ""), (1, "Bad rule"), (0, ""), (0, "")]);
        default_init().run(&mut runner).unwrap();
        assert_eq!(
            runner.ran,
            [
                "iptables-restore --noflush < 9 lines",
                "iptables -t nat -C PREROUTING -p tcp -j MANDATE_INBOUND",
                "iptables -t nat -I PREROUTING -p tcp -j MANDATE_INBOUND",
                "iptables -t nat -C OUTPUT -p tcp -j MANDATE_OUTPUT",
            ]
        );
    }

    #[test]
    fn clean_deletes_every_copy_of_a_jump() {
        let mut runner = Canned::new(&[(0, ""), (0, ""), (0, ""), (1, ""), (1, ""), (0, "")]);
        Script::clean(&[Family::V4]).run(&mut runner).unwrap();
        assert_eq!(
            runner.ran,
            [
                "iptables-restore --noflush < 4 lines",
                "iptables -t nat -D PREROUTING -p tcp -j MANDATE_INBOUND",
                "iptables -t nat -D PREROUTING -p tcp -j MANDATE_INBOUND",
                "iptables -t nat -D PREROUTING -p tcp -j MANDATE_INBOUND",
                "iptables -t nat -D OUTPUT -p tcp -j MANDATE_OUTPUT",
                "iptables-restore --noflush < 4 lines",
            ]
        );
    }

    #[test]
    fn a_failing_command_is_named_with_its_stderr_and_what_to_do() {
        let denied = "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n";
        let err = default_init()
            .run(&mut Canned::new(&[(4, denied)]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "`iptables-restore --noflush` failed (exit status: 4): iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root); it needs root or the NET_ADMIN capability (and NET_RAW for iptables-legacy) in the pod's network namespace, and a kernel with the nat table; Kubernetes: securityContext.capabilities.add: [NET_ADMIN, NET_RAW]"
        );

        let legacy = "iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat'\nError occurred at line: 1\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        let err = default_init()
            .run(&mut Canned::new(&[(2, legacy)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("`iptables-restore --noflush` failed (exit status: 2): iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat' / Error occurred at line: 1; it needs root or the NET_ADMIN capability (and NET_RAW for iptables-legacy)"),
            "{err}"
        );

        let busy = "iptables-restore v1.8.9 (nf_tables): \nline 2: CHAIN_DEL failed (Device or resource busy): chain MANDATE_OUTPUT";
        let err = Script::clean(&[Family::V4])
            .run(&mut Canned::new(&[(0, ""), (1, ""), (1, ""), (4, busy)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("`iptables-restore --noflush` failed (exit status: 4)"),
            "{err}"
        );
        assert!(err.ends_with("another rule still jumps to the chain: find it with `iptables-save -t nat`, delete it, and run clean-iptables again"), "{err}");
    }

    #[test]
    fn a_check_that_fails_other_than_absent_stops_init() {
        let mut runner = Canned::new(&[(0, ""), (2, "Couldn't load target")]);
        let err = default_init().run(&mut runner).unwrap_err().to_string();
        assert!(
            err.starts_with("`iptables -t nat -C PREROUTING -p tcp -j MANDATE_INBOUND` failed (exit status: 2): Couldn't load target;"),
            "{err}"
        );
        assert_eq!(runner.ran.len(), 2, "no -I after a failed -C");
    }

    #[test]
    fn a_missing_tool_says_to_install_iptables() {
        let err = default_init()
            .run(&mut Canned::new(&[]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "cannot run `iptables-restore --noflush`: no such file (is iptables installed? apt-get install iptables)"
        );
    }
}
