//! Free loopback ports for the sidecars' listeners.
//!
//! Ports come from 20000–31999, below Linux's ephemeral range (32768–60999), so the client side of the
//! tests' own connections cannot sit on a port a sidecar is about to bind. Each candidate is checked by
//! binding it; tests in one process share a counter so they never hand out the same port twice. The tiny
//! window between the check and the sidecar's bind is covered by the sidecar builder, which retries with
//! fresh ports when a sidecar exits because an address was in use.

use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20000;
const SPAN: u32 = 12000;

fn counter() -> &'static AtomicU32 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    // Start at a per-process offset so two test binaries run side by side rarely probe the same ports.
    NEXT.get_or_init(|| AtomicU32::new((std::process::id().wrapping_mul(7919)) % SPAN))
}

/// A loopback address whose port is free right now.
pub fn free_addr() -> SocketAddr {
    for _ in 0..SPAN {
        let port = FIRST + counter().fetch_add(1, Ordering::Relaxed) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}
