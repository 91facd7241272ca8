//! The tamper-evident audit log: the canonical encoding of a chained decision record, the hash
//! chain, signed checkpoints, and the verifier shared by `GET /v1/audit/verify` and the offline
//! `mandate audit verify --file`.
//!
//! Every ingested decision gets a gap-free sequence number `seq` (1, 2, …) and
//!
//! ```text
//! hash = hex(SHA-256(prev_hash || canonical))
//! ```
//!
//! where `prev_hash` is the 64 lowercase hex characters of the previous record's hash (64 `0`s for
//! seq 1) and `canonical` the UTF-8 bytes of the JSON object
//! `{"decision_id":…,"record":…,"reported_by":…,"seq":…}`: keys sorted by their UTF-8 bytes at
//! every level, no whitespace, strings escaped as serde_json does (`"`, `\` and control
//! characters only), numbers as serde_json prints them. `record` is the decision record as stored.
//!
//! A checkpoint `{seq, hash, created_at}` is signed (ECDSA P-256 SHA-256, ASN.1 DER, base64) by the
//! control plane's CA key over `mandate-audit-checkpoint-v1\0` followed by the canonical JSON of
//! `{"created_at":…,"hash":…,"seq":…}`.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain separation of checkpoint signatures (never a bundle's or a certificate's).
pub const CHECKPOINT_LABEL: &[u8] = b"mandate-audit-checkpoint-v1\0";
/// A checkpoint is due once this many records were appended since the last one.
pub const CHECKPOINT_EVERY: u64 = 1_000;

/// Appends the canonical JSON of `v` (sorted keys, no whitespace) to `out`.
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        // null, booleans and numbers print the same with every serde_json setting.
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// The canonical JSON of `v`.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// The canonical encoding of a chained record (see the module documentation).
pub fn canonical_entry(seq: u64, decision_id: &str, reported_by: &str, record: &Value) -> String {
    canonical_entry_raw(seq, decision_id, reported_by, &canonical(record))
}

/// [`canonical_entry`] of a record already in canonical JSON.
pub fn canonical_entry_raw(
    seq: u64,
    decision_id: &str,
    reported_by: &str,
    record_canonical: &str,
) -> String {
    let mut out = String::with_capacity(96 + record_canonical.len());
    out.push_str("{\"decision_id\":");
    write_string(decision_id, &mut out);
    out.push_str(",\"record\":");
    out.push_str(record_canonical);
    out.push_str(",\"reported_by\":");
    write_string(reported_by, &mut out);
    let _ = write!(out, ",\"seq\":{seq}}}");
    out
}

/// `hex(SHA-256(prev_hash || canonical))`.
pub fn chain_hash(prev_hash: &str, canonical: &str) -> String {
    let mut input = Vec::with_capacity(prev_hash.len() + canonical.len());
    input.extend_from_slice(prev_hash.as_bytes());
    input.extend_from_slice(canonical.as_bytes());
    mandate_wire::join::hex(digest(&SHA256, &input).as_ref())
}

/// One record of the chain, as exported and verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainedRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// The decision's id.
    pub decision_id: String,
    /// The SPIFFE ID of the sidecar that reported it.
    pub reported_by: String,
    /// The previous record's hash (64 `0`s for seq 1).
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
    /// The decision record.
    pub record: Value,
}

impl ChainedRecord {
    /// The hash this record should carry.
    pub fn expected_hash(&self) -> String {
        chain_hash(
            &self.prev_hash,
            &canonical_entry(self.seq, &self.decision_id, &self.reported_by, &self.record),
        )
    }
}

/// A signed statement that the chain's record `seq` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The record covered (and every one before it).
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
    /// When the checkpoint was made, RFC 3339.
    pub created_at: String,
    /// ECDSA P-256 SHA-256 (ASN.1 DER, base64) by the control plane's CA key.
    pub signature: String,
}

/// What a checkpoint's signature covers.
pub fn checkpoint_signing_input(seq: u64, hash: &str, created_at: &str) -> Vec<u8> {
    let body = canonical(&serde_json::json!({"created_at": created_at, "hash": hash, "seq": seq}));
    let mut input = CHECKPOINT_LABEL.to_vec();
    input.extend_from_slice(body.as_bytes());
    input
}

impl Checkpoint {
    /// Signs a checkpoint; `sign` returns an ECDSA P-256 SHA-256 ASN.1 signature of its input.
    pub fn sign<E>(
        seq: u64,
        hash: String,
        created_at: String,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Self, E> {
        let signature = STANDARD.encode(sign(&checkpoint_signing_input(seq, &hash, &created_at))?);
        Ok(Self {
            seq,
            hash,
            created_at,
            signature,
        })
    }

    /// Whether one of `keys` (CA public keys) signed it.
    pub fn signed_by(&self, keys: &TrustKeys) -> bool {
        let Ok(signature) = STANDARD.decode(&self.signature) else {
            return false;
        };
        let input = checkpoint_signing_input(self.seq, &self.hash, &self.created_at);
        keys.0.iter().any(|key| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
                .verify(&input, &signature)
                .is_ok()
        })
    }
}

/// The public keys of the CA certificates checkpoints are verified against.
#[derive(Debug, Clone)]
pub struct TrustKeys(Vec<Vec<u8>>);

impl TrustKeys {
    /// The keys of every certificate in `pem`; an error when there is none.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let keys: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .filter_map(Result::ok)
            .filter_map(|der| {
                X509Certificate::from_der(&der)
                    .ok()
                    .map(|(_, cert)| cert.public_key().subject_public_key.data.to_vec())
            })
            .collect();
        if keys.is_empty() {
            return Err("no parseable certificate in the CA file".into());
        }
        Ok(Self(keys))
    }
}

/// One line of `mandate audit export` (and an entry of `GET /v1/audit/records`): a record, or a
/// checkpoint placed right after the record it covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    /// A chained record.
    Record(ChainedRecord),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
}

/// How the chain is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Breakage {
    /// A record's contents no longer match its hash.
    Altered,
    /// A record that the chain does not link to (or outside the chain).
    Inserted,
    /// Records missing from the chain.
    Removed,
    /// A checkpoint that is not signed by the CA, or does not match the chain.
    Checkpoint,
}

/// The first place the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of break.
    pub kind: Breakage,
    /// The seq of the record named (for a removal: the first missing seq).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The decision id of the record named, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

/// Walks a chain in order; stops at the first break.
#[derive(Debug)]
pub struct Verifier {
    keys: TrustKeys,
    /// The seq the next record must carry.
    next_seq: u64,
    /// The hash the next record's prev_hash must be (None: take the first record's as given).
    prev_hash: Option<String>,
    /// The records and checkpoints verified.
    pub records: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// The seq of the last checkpoint verified (0 when none).
    pub last_checkpoint: u64,
}

impl Verifier {
    /// A verifier of a chain from its start.
    pub fn new(keys: TrustKeys) -> Self {
        Self {
            keys,
            next_seq: 1,
            prev_hash: Some(GENESIS.to_owned()),
            records: 0,
            checkpoints: 0,
            last_checkpoint: 0,
        }
    }

    /// A verifier of a chain that starts at `first_seq` (an export made with `--since`): the first
    /// record's prev_hash is taken as given.
    pub fn starting_at(keys: TrustKeys, first_seq: u64) -> Self {
        let mut v = Self::new(keys);
        if first_seq > 1 {
            v.next_seq = first_seq;
            v.prev_hash = None;
        }
        v
    }

    /// The seq of the last record verified (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Checks the next entry.
    pub fn entry(&mut self, entry: &Entry) -> Result<(), Failure> {
        match entry {
            Entry::Record(r) => self.record(r),
            Entry::Checkpoint(c) => self.checkpoint(c),
        }
    }

    /// Checks the next record.
    pub fn record(&mut self, r: &ChainedRecord) -> Result<(), Failure> {
        let named = |kind, message: String| Failure {
            kind,
            seq: Some(r.seq),
            decision_id: Some(r.decision_id.clone()),
            message,
        };
        if r.seq > self.next_seq {
            let missing = if r.seq == self.next_seq + 1 {
                format!("record seq {} is missing", self.next_seq)
            } else {
                format!("records seq {}-{} are missing", self.next_seq, r.seq - 1)
            };
            return Err(Failure {
                kind: Breakage::Removed,
                seq: Some(self.next_seq),
                decision_id: None,
                message: format!(
                    "{missing} (removed): the chain jumps to seq {} (decision {})",
                    r.seq, r.decision_id
                ),
            });
        }
        if r.seq < self.next_seq {
            return Err(named(
                Breakage::Inserted,
                format!(
                    "record seq {} (decision {}) repeats or goes back in the sequence after seq {} (inserted)",
                    r.seq,
                    r.decision_id,
                    self.last_seq()
                ),
            ));
        }
        if let Some(prev) = &self.prev_hash
            && r.prev_hash != *prev
        {
            return Err(named(
                Breakage::Inserted,
                format!(
                    "record seq {} (decision {}) does not link to the record before it: its prev_hash is not the hash of seq {} (inserted or reordered)",
                    r.seq,
                    r.decision_id,
                    self.last_seq()
                ),
            ));
        }
        if r.expected_hash() != r.hash {
            return Err(named(
                Breakage::Altered,
                format!(
                    "record seq {} (decision {}) does not match its hash (altered)",
                    r.seq, r.decision_id
                ),
            ));
        }
        self.next_seq = r.seq + 1;
        self.prev_hash = Some(r.hash.clone());
        self.records += 1;
        Ok(())
    }

    /// Checks a checkpoint, which must follow the record it covers.
    pub fn checkpoint(&mut self, c: &Checkpoint) -> Result<(), Failure> {
        let failure = |kind, message: String| Failure {
            kind,
            seq: Some(c.seq),
            decision_id: None,
            message,
        };
        if !c.signed_by(&self.keys) {
            return Err(failure(
                Breakage::Checkpoint,
                format!(
                    "the checkpoint at seq {} is not signed by the control plane's CA",
                    c.seq
                ),
            ));
        }
        if c.seq != self.last_seq() || self.records == 0 {
            return Err(failure(
                Breakage::Removed,
                format!(
                    "the signed checkpoint at seq {} covers a record that is not in the chain (the chain ends at seq {}): records were removed",
                    c.seq,
                    self.last_seq()
                ),
            ));
        }
        if self.prev_hash.as_deref() != Some(c.hash.as_str()) {
            return Err(failure(
                Breakage::Checkpoint,
                format!(
                    "the signed checkpoint at seq {} has another hash than the chain's record seq {}: the chain up to it was rewritten",
                    c.seq, c.seq
                ),
            ));
        }
        self.checkpoints += 1;
        self.last_checkpoint = c.seq;
        Ok(())
    }

    /// "N records, M checkpoints", singular where it is one.
    pub fn counts(&self) -> String {
        format!(
            "{}, {}",
            counted(self.records, "record"),
            counted(self.checkpoints, "checkpoint")
        )
    }

    /// A one-line summary of what was verified.
    pub fn summary(&self) -> String {
        let mut s = format!("{} verified", self.counts());
        let unsigned = self.last_seq().saturating_sub(self.last_checkpoint);
        if unsigned > 0 && self.records > 0 {
            let _ = write!(
                s,
                " ({unsigned} records after the last checkpoint are chained but not yet signed)"
            );
        }
        s
    }
}

/// How often the checkpoint task looks at the chain head.
const CHECKPOINT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Signs the chain head as a checkpoint when it moved and either [`CHECKPOINT_EVERY`] records
/// arrived since the last checkpoint or `interval` passed since it; returns the new checkpoint.
pub async fn checkpoint_if_due(
    store: &crate::store::Store,
    ca: &mandate_identity::ca::CertificateAuthority,
    interval: std::time::Duration,
) -> anyhow::Result<Option<Checkpoint>> {
    use time::format_description::well_known::Rfc3339;
    let head = store.audit_head().await?;
    let last = store.last_audit_checkpoint().await?;
    let (last_seq, last_at) = match &last {
        Some(c) => (
            c.seq,
            time::OffsetDateTime::parse(&c.created_at, &Rfc3339).ok(),
        ),
        None => (0, None),
    };
    if head.seq <= last_seq {
        return Ok(None);
    }
    let now = time::OffsetDateTime::now_utc();
    let old_enough = last_at.is_none_or(|at| now - at >= interval);
    if head.seq - last_seq < CHECKPOINT_EVERY && !old_enough {
        return Ok(None);
    }
    let created_at = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)?
        .format(&Rfc3339)?;
    let checkpoint = Checkpoint::sign(head.seq, head.hash, created_at, |input| {
        ca.sign_bytes(input)
    })?;
    store.insert_audit_checkpoint(&checkpoint).await?;
    Ok(Some(checkpoint))
}

/// Makes checkpoints (see [`checkpoint_if_due`]) until `cancel` fires, and a last one then.
pub async fn maintain_checkpoints(
    store: crate::store::Store,
    ca: std::sync::Arc<mandate_identity::ca::CertificateAuthority>,
    interval: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let stopping = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(CHECKPOINT_POLL) => false,
        };
        // On the way out, sign whatever arrived since the last checkpoint.
        let due = if stopping {
            std::time::Duration::ZERO
        } else {
            interval
        };
        match checkpoint_if_due(&store, &ca, due).await {
            Ok(Some(c)) => tracing::debug!(seq = c.seq, "audit checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not make an audit checkpoint"),
        }
        if stopping {
            return;
        }
    }
}

/// `n thing` or `n things`.
fn counted(n: impl Into<u64>, thing: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_identity::TrustDomain;
    use mandate_identity::ca::CertificateAuthority;
    use serde_json::json;
    use std::time::Duration;

    fn ca() -> CertificateAuthority {
        let td: TrustDomain = "mandate.local".parse().unwrap();
        CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level_and_has_no_whitespace() {
        let v = json!({"b": 1, "a": {"z": [true, null, "x\"y"], "é": 2.5, "A": "ü\n"}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"A":"ü\n","z":[true,null,"x\"y"],"é":2.5},"b":1}"#
        );
        // The same value in another key order encodes the same.
        let w: Value =
            serde_json::from_str(r#"{ "a": {"é":2.5, "A":"ü\n", "z":[true,null,"x\"y"]}, "b":1 }"#)
                .unwrap();
        assert_eq!(canonical(&v), canonical(&w));
    }

    #[test]
    fn an_entry_encodes_its_fields_in_key_order() {
        assert_eq!(
            canonical_entry(7, "d1", "spiffe://td/agent/a", &json!({"y": 1, "x": 2})),
            r#"{"decision_id":"d1","record":{"x":2,"y":1},"reported_by":"spiffe://td/agent/a","seq":7}"#
        );
        // A known vector (computed independently: Python's json.dumps with sort_keys, compact
        // separators and ensure_ascii=False, then hashlib.sha256 over "0"*64 + that).
        let entry = canonical_entry(
            7,
            "d1",
            "spiffe://td/agent/a",
            &json!({"y": 1, "x": 2, "s": "é\""}),
        );
        assert_eq!(
            entry,
            r#"{"decision_id":"d1","record":{"s":"é\"","x":2,"y":1},"reported_by":"spiffe://td/agent/a","seq":7}"#
        );
        assert_eq!(
            chain_hash(GENESIS, &entry),
            "111e6cb1f1d042b3dd69767baa16b7323bd57b5ece05b8c81e63eea68da0f285"
        );
    }

    /// A chain of `n` records with a checkpoint after every `every`-th.
    fn chain(ca: &CertificateAuthority, n: u64, every: u64) -> Vec<Entry> {
        let mut prev = GENESIS.to_owned();
        let mut out = Vec::new();
        for seq in 1..=n {
            let mut r = ChainedRecord {
                seq,
                decision_id: format!("d{seq}"),
                reported_by: "spiffe://mandate.local/agent/a".into(),
                prev_hash: prev.clone(),
                hash: String::new(),
                record: json!({"decision_id": format!("d{seq}"), "allow": seq % 2 == 0}),
            };
            r.hash = r.expected_hash();
            prev = r.hash.clone();
            out.push(Entry::Record(r.clone()));
            if seq % every == 0 {
                out.push(Entry::Checkpoint(
                    Checkpoint::sign(seq, r.hash, "2026-01-01T00:00:00Z".into(), |i| {
                        ca.sign_bytes(i)
                    })
                    .unwrap(),
                ));
            }
        }
        out
    }

    fn verify(ca: &CertificateAuthority, entries: &[Entry]) -> Result<Verifier, Failure> {
        let mut v = Verifier::new(TrustKeys::from_pem(ca.cert_pem()).unwrap());
        for e in entries {
            v.entry(e)?;
        }
        Ok(v)
    }

    fn record_mut(entries: &mut [Entry], seq: u64) -> &mut ChainedRecord {
        entries
            .iter_mut()
            .find_map(|e| match e {
                Entry::Record(r) if r.seq == seq => Some(r),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let ca = ca();
        let v = verify(&ca, &chain(&ca, 10, 4)).unwrap();
        assert_eq!((v.records, v.checkpoints), (10, 2));
        assert_eq!(
            v.summary(),
            "10 records, 2 checkpoints verified (2 records after the last checkpoint are chained but not yet signed)"
        );
    }

    #[test]
    fn an_altered_record_is_named() {
        let ca = ca();
        let mut entries = chain(&ca, 10, 4);
        record_mut(&mut entries, 6).record["allow"] = json!(false);
        let f = verify(&ca, &entries).unwrap_err();
        assert_eq!(
            (f.kind, f.seq, f.decision_id.as_deref()),
            (Breakage::Altered, Some(6), Some("d6"))
        );
    }

    #[test]
    fn a_rehashed_alteration_breaks_the_link_or_the_checkpoint() {
        let ca = ca();
        let mut entries = chain(&ca, 10, 4);
        let r = record_mut(&mut entries, 8);
        r.record["allow"] = json!(false);
        r.hash = r.expected_hash();
        let f = verify(&ca, &entries).unwrap_err();
        // Record 8 is covered by the checkpoint at 8, whose hash no longer matches.
        assert_eq!((f.kind, f.seq), (Breakage::Checkpoint, Some(8)));
    }

    #[test]
    fn a_removed_record_is_named_by_its_seq() {
        let ca = ca();
        let mut entries = chain(&ca, 10, 4);
        entries.retain(|e| !matches!(e, Entry::Record(r) if r.seq == 3));
        let f = verify(&ca, &entries).unwrap_err();
        assert_eq!((f.kind, f.seq), (Breakage::Removed, Some(3)));
        assert!(f.message.contains("d4"), "{}", f.message);
        // Removing the last records shows at the checkpoint that covered them.
        let mut entries = chain(&ca, 8, 4);
        entries.retain(|e| !matches!(e, Entry::Record(r) if r.seq >= 7));
        let f = verify(&ca, &entries).unwrap_err();
        assert_eq!((f.kind, f.seq), (Breakage::Removed, Some(8)));
    }

    #[test]
    fn an_inserted_record_is_named() {
        let ca = ca();
        let mut entries = chain(&ca, 6, 10);
        let Entry::Record(mut extra) = entries[2].clone() else {
            unreachable!()
        };
        extra.decision_id = "forged".into();
        extra.hash = extra.expected_hash();
        // Renumber what follows, as an inserter must to keep seq continuous.
        for e in &mut entries[3..] {
            if let Entry::Record(r) = e {
                r.seq += 1;
            }
        }
        extra.seq = 4;
        extra.prev_hash = match &entries[2] {
            Entry::Record(r) => r.hash.clone(),
            Entry::Checkpoint(_) => unreachable!(),
        };
        extra.hash = extra.expected_hash();
        entries.insert(3, Entry::Record(extra));
        let f = verify(&ca, &entries).unwrap_err();
        // The forged record links; the one after it no longer does.
        assert_eq!(
            (f.kind, f.seq, f.decision_id.as_deref()),
            (Breakage::Inserted, Some(5), Some("d4"))
        );
    }

    #[test]
    fn a_checkpoint_not_signed_by_the_ca_fails() {
        let ca = ca();
        let other = self::ca();
        let mut entries = chain(&ca, 4, 4);
        entries.extend(chain(&other, 4, 4).into_iter().skip(4));
        // chain(&other) has the same records (same content): only the signature differs.
        let f = verify(&ca, &entries).unwrap_err();
        assert_eq!((f.kind, f.seq), (Breakage::Checkpoint, Some(4)));
        assert!(f.message.contains("not signed"), "{}", f.message);
    }

    #[test]
    fn entries_round_trip_as_json_lines() {
        let ca = ca();
        for e in chain(&ca, 2, 2) {
            let line = serde_json::to_string(&e).unwrap();
            assert!(line.starts_with(r#"{"kind":"#), "{line}");
            assert_eq!(serde_json::from_str::<Entry>(&line).unwrap(), e);
        }
    }
}
