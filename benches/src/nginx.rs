//! Topology (c): client → nginx A (plain HTTP) → mTLS → nginx B → app, the conventional way to build
//! the same pair, configured to be as comparable as nginx allows.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use http::{HeaderValue, Uri};

use crate::certs::{NGINX_B_DNS, Pair};
use crate::loadgen::{self, Target};
use crate::procs::{self, Child, Spawn};
use crate::topology::{BODY_BYTES, Env, Running, SetupError, TOOL_AUTHORITY, os_args};

/// Finds nginx, installing Debian's package when it is missing and we may.
fn locate(env: &Env<'_>) -> Result<PathBuf, SetupError> {
    if let Some(p) = &env.args.nginx {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(SetupError::Unavailable(format!(
                "--nginx {} not found",
                p.display()
            )))
        };
    }
    if let Some(p) = procs::which("nginx") {
        return Ok(p);
    }
    if env.args.no_install {
        return Err(SetupError::Unavailable(
            "nginx is not installed and --no-install was given".into(),
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(SetupError::Unavailable(
            "nginx is not installed and installing it needs root (apt-get install nginx)".into(),
        ));
    }
    eprintln!("   nginx missing: apt-get install -y nginx");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut out = install();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        // A fresh machine has no package lists yet.
        let _ = Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .output();
        out = install();
    }
    match (out, procs::which("nginx")) {
        (Ok(o), Some(p)) if o.status.success() => Ok(p),
        (Ok(o), _) => Err(SetupError::Unavailable(format!(
            "nginx is not installed and `apt-get install nginx` failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))),
        (Err(e), _) => Err(SetupError::Unavailable(format!(
            "nginx is not installed and apt-get could not run: {e}"
        ))),
    }
}

/// nginx's version and TLS library, from `nginx -V`.
fn version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-V")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| l.starts_with("nginx version") || l.starts_with("built with"))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Settings common to both instances: foreground master, N workers, everything inside `prefix`.
fn main_block(prefix: &Path, workers: usize) -> String {
    let p = prefix.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         worker_rlimit_nofile 8192;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

/// `http` settings common to both: no access log (the sidecars log nothing per request either),
/// temp paths inside the prefix, and keep-alive limits high enough that no connection is recycled
/// mid-run (nginx closes client and upstream connections after 1000 requests by default).
fn http_common(prefix: &Path) -> String {
    let p = prefix.display();
    let mut s = String::new();
    s.push_str("    access_log off;\n");
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(s, "    {t}_temp_path {p}/{t}_temp;");
    }
    s.push_str("    keepalive_requests 10000000;\n    keepalive_timeout 75s;\n");
    s
}

/// Upstream keep-alive settings for a `location`. They must sit next to any other
/// `proxy_set_header`: a location that sets one inherits none from the enclosing block.
const PROXY_KEEPALIVE: &str = "            proxy_http_version 1.1;\n\
                               \x20           proxy_set_header Connection \"\";\n\
                               \x20           proxy_set_header Host $http_host;\n";

/// nginx B: terminates mTLS (client certificate required, checked against the CA) and forwards to
/// the app over keep-alive connections, stamping who called as the sidecar does.
fn config_b(prefix: &Path, env: &Env<'_>, listen: &str, tls: &Pair) -> String {
    format!(
        "{main}http {{\n{common}\
         \x20   upstream app {{ server {app}; keepalive 64; keepalive_requests 10000000; }}\n\
         \x20   server {{\n\
         \x20       listen {listen} ssl;\n\
         \x20       ssl_certificate {cert};\n\
         \x20       ssl_certificate_key {key};\n\
         \x20       ssl_client_certificate {ca};\n\
         \x20       ssl_verify_client on;\n\
         \x20       ssl_verify_depth 2;\n\
         \x20       location / {{\n\
         {PROXY_KEEPALIVE}\
         \x20           proxy_set_header x-forwarded-client-cert \"Hash=$ssl_client_fingerprint;Subject=$ssl_client_s_dn\";\n\
         \x20           proxy_pass http://app;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        main = main_block(prefix, env.args.workers),
        common = http_common(prefix),
        app = env.app,
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = env.certs.bundle.display(),
    )
}

/// nginx A: plain HTTP in, mTLS out to nginx B with a client certificate, verifying B's certificate
/// by the DNS SAN (nginx cannot check a SPIFFE URI SAN), over keep-alive upstream connections.
fn config_a(prefix: &Path, env: &Env<'_>, listen: &str, b: &str, tls: &Pair) -> String {
    format!(
        "{main}http {{\n{common}\
         \x20   upstream tool {{ server {b}; keepalive 64; keepalive_requests 10000000; }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         {PROXY_KEEPALIVE}\
         \x20           proxy_pass https://tool;\n\
         \x20           proxy_ssl_certificate {cert};\n\
         \x20           proxy_ssl_certificate_key {key};\n\
         \x20           proxy_ssl_trusted_certificate {ca};\n\
         \x20           proxy_ssl_verify on;\n\
         \x20           proxy_ssl_verify_depth 2;\n\
         \x20           proxy_ssl_name {NGINX_B_DNS};\n\
         \x20           proxy_ssl_server_name on;\n\
         \x20           proxy_ssl_session_reuse on;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        main = main_block(prefix, env.args.workers),
        common = http_common(prefix),
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = env.certs.bundle.display(),
    )
}

/// Writes `conf` into its own prefix dir, checks it with `nginx -t`, and starts the instance.
fn launch(
    env: &Env<'_>,
    nginx: &Path,
    name: &str,
    conf: impl Fn(&Path) -> String,
) -> anyhow::Result<(Child, String)> {
    let prefix = env.tmp.join(name);
    std::fs::create_dir_all(&prefix)?;
    let conf_path = prefix.join("nginx.conf");
    let text = conf(&prefix);
    std::fs::write(&conf_path, &text)?;
    let args = |test: bool| {
        let mut a = vec![
            "-p".to_owned(),
            format!("{}/", prefix.display()),
            "-c".to_owned(),
            conf_path.display().to_string(),
            // Without -e nginx first opens its compiled-in /var/log/nginx/error.log.
            "-e".to_owned(),
            prefix.join("error.log").display().to_string(),
        ];
        if test {
            a.push("-t".to_owned());
        }
        a
    };
    let test = Command::new(nginx)
        .args(args(true))
        .output()
        .with_context(|| format!("running {} -t", nginx.display()))?;
    if !test.status.success() {
        return Err(anyhow!(
            "{name}: nginx -t rejected {}:\n{}",
            conf_path.display(),
            String::from_utf8_lossy(&test.stderr)
        ));
    }
    let child = Child::spawn(
        env.pinner,
        Spawn {
            name,
            program: nginx,
            args: os_args(args(false)),
            cpus: env.cpus_proxy,
            env: vec![],
            log_dir: env.tmp,
        },
    )?;
    Ok((child, text))
}

/// Starts the nginx pair and waits until a request passes through it.
pub async fn start(env: &Env<'_>) -> Result<Running, SetupError> {
    let nginx = locate(env)?;
    let ports = procs::free_ports(2)?;
    let (a_addr, b_addr) = (ports[0], ports[1]);
    let (a_listen, b_listen) = (a_addr.to_string(), b_addr.to_string());
    let (mut b, conf_b) = launch(env, &nginx, "nginx-B-inbound", |p| {
        config_b(p, env, &b_listen, &env.certs.nginx_b)
    })?;
    let (mut a, conf_a) = launch(env, &nginx, "nginx-A-outbound", |p| {
        config_a(p, env, &a_listen, &b_listen, &env.certs.nginx_a)
    })?;
    b.wait_for_port(b_addr, Duration::from_secs(10))?;
    a.wait_for_port(a_addr, Duration::from_secs(10))?;

    // Origin-form with the destination in Host, as an app configured with nginx A as its base URL sends.
    let target = Target {
        connect: a_addr,
        uri: Uri::from_static("/"),
        host: HeaderValue::from_static(TOOL_AUTHORITY),
        expect_body: Some(BODY_BYTES),
        headers: vec![],
    };
    if let Err(e) = loadgen::probe(&target, Instant::now() + Duration::from_secs(5)).await {
        let log = |n: &str| {
            std::fs::read_to_string(env.tmp.join(n).join("error.log")).unwrap_or_default()
        };
        return Err(anyhow!(
            "a request through the nginx pair failed: {e}\n--- nginx A error.log:\n{}\n--- nginx B error.log:\n{}",
            log("nginx-A-outbound"),
            log("nginx-B-inbound")
        )
        .into());
    }
    Ok(Running {
        target,
        procs: vec![a, b],
        facts: vec![version(&nginx)],
        configs: vec![
            ("nginx-A-outbound/nginx.conf".to_owned(), conf_a),
            ("nginx-B-inbound/nginx.conf".to_owned(), conf_b),
        ],
        decision_logs: vec![],
    })
}
