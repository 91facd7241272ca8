//! The upstream app: a minimal hyper HTTP/1.1 server that answers every request with a fixed body.
//!
//! It runs in its own process (`mandate-bench app`) so its memory and CPU are not mixed with the load
//! generator's, and on a single-threaded runtime because it shares the load generator's CPU.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, body::Incoming, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::cli::AppArgs;
use crate::procs::{self, Child, Pinner, Spawn};
use crate::topology::BODY_BYTES;

/// Starts the app (this binary's `app` subcommand, answering `BODY_BYTES`) on a free loopback
/// port, pinned to `cpus` and logging into `log_dir`; returns it once the port answers.
pub fn start(
    pinner: &Pinner,
    cpus: &[usize],
    log_dir: &std::path::Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let addr = procs::free_ports(1)?[0];
    let exe = std::env::current_exe().context("locating our own binary for the app process")?;
    let mut app = Child::spawn(
        pinner,
        Spawn {
            name: "app",
            program: &exe,
            args: vec![
                "app".into(),
                "--listen".into(),
                addr.to_string().into(),
                "--body-bytes".into(),
                BODY_BYTES.to_string().into(),
            ],
            cpus,
            env: vec![],
            log_dir,
        },
    )?;
    app.wait_for_port(addr, Duration::from_secs(10))?;
    Ok((app, addr))
}

/// Runs the app until killed.
pub fn run(args: &AppArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    rt.block_on(serve(args.listen, body))
}

async fn serve(addr: SocketAddr, body: Bytes) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("app: cannot listen on {addr}"))?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("app: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let mut resp = Response::new(Full::new(body));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            // A peer closing mid-request is normal at the end of a phase; nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
