//! Reading Prometheus text exposition.

use std::collections::BTreeMap;

/// A scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric (series) name, e.g. `mandate_requests_total`.
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Metrics {
    /// Every sample in the scrape.
    pub fn samples(&self) -> Vec<Sample> {
        self.0.lines().filter_map(parse_line).collect()
    }

    /// Sum of the samples of `name` whose labels include all of `labels` (0 when none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// The samples of `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
        self.samples()
            .into_iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples().iter().any(|s| s.name == name)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let end = closing_brace(body)?;
        parse_labels(&body[..end], &mut labels)?;
        &body[end + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn closing_brace(body: &str) -> Option<usize> {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            '}' if !in_str => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(mut s: &str, out: &mut BTreeMap<String, String>) -> Option<()> {
    loop {
        s = s.trim_start_matches([',', ' ']);
        if s.is_empty() {
            return Some(());
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        let rest = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.insert(key, value);
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_bare_samples() {
        let m = Metrics(
            "# HELP x y\n# TYPE x counter\n\
             mandate_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown_ca\"} 2\n\
             mandate_tls_handshake_failures_total{reason=\"expired\",direction=\"inbound\"} 1\n\
             mandate_open_connections 3\n\
             weird{a=\"x,}\\\"y\"} 4 1700000000\n"
                .to_owned(),
        );
        let name = "mandate_tls_handshake_failures_total";
        assert_eq!(m.sum(name, &[("direction", "inbound")]), 3.0);
        assert_eq!(m.sum(name, &[("reason", "expired")]), 1.0);
        assert_eq!(m.sum(name, &[("reason", "other")]), 0.0);
        assert_eq!(m.sum("mandate_open_connections", &[]), 3.0);
        assert_eq!(m.sum("weird", &[("a", "x,}\"y")]), 4.0);
        assert!(m.has("weird") && !m.has("absent"));
    }
}
