//! Throwaway CA and certificates for both pairs, minted with `mandate_identity::ca`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mandate_identity::ca::{CertificateAuthority, svid_params};
use mandate_identity::{SpiffeId, TrustDomain};
use rcgen::{KeyPair, SanType};

/// Trust domain of the benchmark's identities.
pub const TRUST_DOMAIN: &str = "mandate.local";
/// The caller's identity (behind sidecar A / nginx A).
pub const AGENT: &str = "bench";
/// The destination's identity (behind sidecar B / nginx B).
pub const TOOL: &str = "tool";
/// DNS name in nginx B's certificate, which nginx A verifies (nginx cannot check URI SANs).
pub const NGINX_B_DNS: &str = "tool.mandate.local";

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate PEM.
    pub cert: PathBuf,
    /// PKCS#8 private key PEM.
    pub key: PathBuf,
}

/// Every file the pairs need.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA certificate: the trust bundle of all four proxies.
    pub bundle: PathBuf,
    /// Sidecar A's SVID (`spiffe://mandate.local/agent/bench`).
    pub agent: Pair,
    /// Sidecar B's SVID (`spiffe://mandate.local/service/tool`).
    pub tool: Pair,
    /// nginx A's client certificate: the agent SVID plus a DNS SAN.
    pub nginx_a: Pair,
    /// nginx B's server certificate: the tool SVID plus the DNS SAN nginx A verifies.
    pub nginx_b: Pair,
    /// The tool's SPIFFE ID, which sidecar A must see on sidecar B.
    pub tool_id: String,
}

/// Mints a CA and the four leaf certificates into `dir`.
pub fn mint(dir: &Path) -> anyhow::Result<Certs> {
    std::fs::create_dir_all(dir)?;
    let td: TrustDomain = TRUST_DOMAIN.parse()?;
    let ca = CertificateAuthority::generate(td.clone(), Duration::from_secs(86_400))?;
    let bundle = dir.join("ca.pem");
    std::fs::write(&bundle, ca.cert_pem())?;
    let ttl = Duration::from_secs(3600);
    let agent_id = SpiffeId::agent(&td, AGENT)?;
    let tool_id = SpiffeId::service(&td, TOOL)?;

    let write = |name: &str, cert: &str, key: &str| -> anyhow::Result<Pair> {
        let pair = Pair {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pair.cert, cert)?;
        std::fs::write(&pair.key, key)?;
        Ok(pair)
    };
    let svid = |name: &str, id: &SpiffeId| -> anyhow::Result<Pair> {
        let issued = ca.issue(id, ttl)?;
        write(name, &issued.cert_pem, &issued.key_pem)
    };
    // An SVID that also carries a DNS SAN: still exactly one URI SAN, so still a valid SVID.
    let with_dns = |name: &str, id: &SpiffeId, dns: &str| -> anyhow::Result<Pair> {
        let mut params = svid_params(id, ttl);
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.try_into().context("DNS SAN")?));
        let key = KeyPair::generate()?;
        let cert = ca.sign(params, &key, id)?;
        write(name, &cert, &key.serialize_pem())
    };

    Ok(Certs {
        agent: svid("agent", &agent_id)?,
        tool: svid("tool", &tool_id)?,
        nginx_a: with_dns("nginx-a", &agent_id, "bench.mandate.local")?,
        nginx_b: with_dns("nginx-b", &tool_id, NGINX_B_DNS)?,
        tool_id: tool_id.to_string(),
        bundle,
    })
}
