//! Whether a grant's scopes stay within an agent's ceiling, decided soundly: "within" is only
//! ever answered when every call the grant scope matches is also matched by the ceiling scope.
//!
//! A scope is an object of patterns over a call's attributes (policies/reference/authz.rego): a
//! field it names must match, a field it leaves out matches anything. A pattern matches a value
//! when it equals it, or — if it holds one of `* ? [ {` — when `glob.match(pattern, [sep], value)`
//! is true, with `.` as separator for `host` and `/` for every other field. Numbers (`port`)
//! are compared exactly, or as their decimal text against a glob.
//!
//! Sidecars evaluate policy with regorus, whose `glob.match` rewrites pattern and value (for
//! `host`: `/` becomes NUL and each `.` becomes `/./`) and hands them to `globset` with
//! `literal_separator`. This module builds the very same `globset` regular expression, turns it
//! into a deterministic automaton over bytes, and searches the product of the grant's automaton,
//! the ceiling's and one for "a value a call can carry" for a string the grant matches and the
//! ceiling does not. Finding one proves the excess and names an example; exhausting the product
//! proves containment. Ports have 65,536 values and are simply enumerated.
//!
//! Sound but incomplete, on purpose:
//! * each grant scope must fit inside one ceiling scope: a grant scope covered only by two
//!   ceiling scopes together is refused;
//! * fields are checked one by one: a grant scope that can match no call at all (an exact string
//!   `port`, say) is still refused if another of its fields is broader than the ceiling's;
//! * a pattern whose automaton would be too large to explore is refused as undecidable here;
//! * a ceiling pattern that is not a valid glob counts only for its literal text (as in policy,
//!   where the failed glob match is simply false).

use std::collections::{HashSet, VecDeque};

use globset::{GlobBuilder, GlobMatcher};
use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::util::syntax;
use regex_automata::{Anchored, MatchKind};
use serde_json::{Map, Value};

/// Most product states explored before giving up (and refusing) on one pattern pair.
const MAX_PRODUCT_STATES: usize = 100_000;
/// Size limit of each automaton; beyond it the pattern pair is refused as undecidable.
const MAX_DFA_BYTES: usize = 8 << 20;

/// A grant scope that is not within any scope of the ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    /// Which grant scope (its index in the grant's `scopes`).
    pub index: usize,
    /// `scopes[0]: "tool": "delete_*" is not within the ceiling (closest: {…}); …`.
    pub message: String,
}

impl Excess {
    /// The field to name in the API error: `scopes[i]`.
    pub fn field(&self) -> String {
        format!("scopes[{}]", self.index)
    }
}

/// Checks that every scope of `scopes` lies within some scope of `ceiling`. Scope shapes are
/// assumed validated (objects of pattern strings, `port` also a number).
pub fn check_within(scopes: &[Value], ceiling: &[Value]) -> Result<(), Excess> {
    for (index, scope) in scopes.iter().enumerate() {
        let Value::Object(scope) = scope else {
            return Err(Excess {
                index,
                message: format!("scopes[{index}]: a scope is an object of patterns"),
            });
        };
        check_scope(index, scope, ceiling)?;
    }
    Ok(())
}

fn check_scope(index: usize, scope: &Map<String, Value>, ceiling: &[Value]) -> Result<(), Excess> {
    // The message shows the ceiling scope with the fewest fields out of bounds and, among those,
    // the most fields within bounds.
    let mut closest: Option<((usize, usize), &Value, FieldExcess)> = None;
    for candidate in ceiling {
        let Value::Object(c) = candidate else {
            continue;
        };
        let excesses = scope_excesses(scope, c);
        let Some(first) = excesses.first() else {
            return Ok(());
        };
        let distance = (excesses.len(), c.len() - excesses.len());
        let closer = closest.as_ref().is_none_or(|(best, _, _)| {
            distance.0 < best.0 || (distance.0 == best.0 && distance.1 > best.1)
        });
        if closer {
            closest = Some((distance, candidate, first.clone()));
        }
    }
    let message = match closest {
        None => format!("scopes[{index}]: the agent's ceiling is empty, so nothing can be granted"),
        Some((_, ceiling_scope, excess)) => {
            let closest = serde_json::to_string(ceiling_scope).unwrap_or_default();
            let field = json_text(&excess.field);
            match excess.why {
                Why::Missing => format!(
                    "scopes[{index}]: {field}: any value (the scope does not name it) is not \
                     within the ceiling (closest: {closest})"
                ),
                Why::Broader { granted, example } => {
                    let granted = serde_json::to_string(&granted).unwrap_or_default();
                    let mut m = format!(
                        "scopes[{index}]: {field}: {granted} is not within the ceiling (closest: {closest})"
                    );
                    if let Some(example) = example {
                        m.push_str(&format!("; it would allow {field} {example}"));
                        if granted == example {
                            m.push_str(" (a pattern also matches its own text)");
                        }
                    }
                    m
                }
                Why::Undecided { granted } => {
                    let granted = serde_json::to_string(&granted).unwrap_or_default();
                    format!(
                        "scopes[{index}]: {field}: {granted} is too complex to prove within the \
                         ceiling (closest: {closest}); use a simpler pattern"
                    )
                }
            }
        }
    };
    Err(Excess { index, message })
}

/// One field of a grant scope that is out of a ceiling scope's bounds.
#[derive(Debug, Clone, PartialEq)]
struct FieldExcess {
    field: String,
    why: Why,
}

#[derive(Debug, Clone, PartialEq)]
enum Why {
    /// The ceiling names the field, the grant does not (so the grant allows any value).
    Missing,
    /// The grant's pattern matches a value the ceiling's does not (an example, JSON text).
    Broader {
        granted: Value,
        example: Option<String>,
    },
    /// The patterns are too large to decide: refused.
    Undecided { granted: Value },
}

/// Every field of `grant` that is not within `ceiling` (empty: the scope is within it).
fn scope_excesses(grant: &Map<String, Value>, ceiling: &Map<String, Value>) -> Vec<FieldExcess> {
    let mut out = Vec::new();
    for (field, ceiling_pattern) in ceiling {
        let Some(granted) = grant.get(field) else {
            out.push(FieldExcess {
                field: field.clone(),
                why: Why::Missing,
            });
            continue;
        };
        let verdict = if field == "port" {
            port_within(granted, ceiling_pattern)
        } else {
            string_within(field, granted, ceiling_pattern)
        };
        match verdict {
            Verdict::Within => {}
            Verdict::Outside(example) => out.push(FieldExcess {
                field: field.clone(),
                why: Why::Broader {
                    granted: granted.clone(),
                    example,
                },
            }),
            Verdict::Undecided => out.push(FieldExcess {
                field: field.clone(),
                why: Why::Undecided {
                    granted: granted.clone(),
                },
            }),
        }
    }
    out
}

/// The outcome for one field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Every value the grant's pattern matches, the ceiling's matches.
    Within,
    /// Not within; an example value the grant matches and the ceiling does not (JSON text).
    Outside(Option<String>),
    /// Too large to decide (counts as not within).
    Undecided,
}

/// Whether `pattern` is a glob to policy: it holds one of `* ? [ {`.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// Whether `pattern` compiles as a glob for `field` (policy treats a glob that does not compile as
/// matching only its own text); grants are refused such patterns so what they mean is clear.
pub fn check_glob(field: &str, pattern: &str) -> Result<(), String> {
    if !is_glob(pattern) {
        return Ok(());
    }
    let Some(text) = transform(field, pattern) else {
        return Err("a pattern may not contain NUL".into());
    };
    GlobBuilder::new(&text)
        .literal_separator(true)
        .build()
        .map(|_| ())
        .map_err(|e| format!("{pattern:?} is not a valid glob pattern: {}", e.kind()))
}

/// What regorus' `glob.match` does to a pattern or value before globset sees it: for `host` (the
/// `.` separator) `/` becomes NUL and `.` becomes `/./`; `/`-separated fields stay as they are.
/// A text holding NUL makes `glob.match` fail: `None`.
fn transform(field: &str, text: &str) -> Option<String> {
    if text.contains('\0') {
        return None;
    }
    if field == "host" {
        Some(text.replace('/', "\0").replace('.', "/./"))
    } else {
        Some(text.to_owned())
    }
}

/// The inverse of [`transform`], to show an example value.
fn untransform(field: &str, text: &str) -> String {
    if field == "host" {
        text.replace("/./", ".").replace('\0', "/")
    } else {
        text.to_owned()
    }
}

/// The globset regular expression of a glob pattern, as regorus would compile it; `None` if it
/// does not compile (then the pattern matches only itself).
fn glob_regex(transformed: &str) -> Option<String> {
    GlobBuilder::new(transformed)
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.regex().to_owned())
}

/// A regular expression (bytes, anchored) matching exactly `text`.
fn literal_regex(text: &str) -> String {
    let mut re = String::from("(?-u)^");
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            re.push(char::from(b));
        } else {
            re.push_str(&format!("\\x{b:02X}"));
        }
    }
    re.push('$');
    re
}

/// The regular expressions of what a pattern matches in the transformed domain: its own text
/// (exact comparison) and, for a glob that compiles, the glob. Empty: it matches nothing.
fn pattern_regexes(field: &str, pattern: &str) -> Vec<String> {
    let Some(text) = transform(field, pattern) else {
        return Vec::new();
    };
    let mut regexes = vec![literal_regex(&text)];
    if is_glob(pattern)
        && let Some(re) = glob_regex(&text)
    {
        regexes.push(re);
    }
    regexes
}

/// The transformed values a call can carry in `field`: valid UTF-8 without NUL; for `host`,
/// `/` only inside the `/./` that stand for dots (and NUL standing for `/`).
fn image_regex(field: &str) -> &'static str {
    if field == "host" {
        r"(?:[^./]|/\./)*"
    } else {
        r"[^\x00]*"
    }
}

/// Part of the image where examples read well: host names of non-empty labels. An example is
/// looked for there first, then in the whole image (containment is decided on the whole).
fn readable_image_regex(field: &str) -> Option<&'static str> {
    (field == "host").then_some(r"[^./\x00]+(?:/\./[^./\x00]+)*")
}

type Dfa = dense::DFA<Vec<u32>>;

fn dense_config() -> dense::Config {
    dense::Config::new()
        .match_kind(MatchKind::All)
        .start_kind(StartKind::Anchored)
        .dfa_size_limit(Some(MAX_DFA_BYTES))
        .determinize_size_limit(Some(MAX_DFA_BYTES))
}

/// The automaton of patterns compiled as globset compiles them (bytes, `.` matching newlines).
fn pattern_dfa(regexes: &[String]) -> Option<Dfa> {
    dense::Builder::new()
        .syntax(syntax::Config::new().utf8(false).dot_matches_new_line(true))
        .configure(dense_config())
        .build_many(regexes)
        .ok()
}

fn image_dfa(regex: &str) -> Option<Dfa> {
    dense::Builder::new()
        .configure(dense_config())
        .build(regex)
        .ok()
}

fn string_within(field: &str, granted: &Value, ceiling: &Value) -> Verdict {
    let Value::String(granted) = granted else {
        // Validation keeps non-strings out of grants; anything else is not provably within.
        return Verdict::Outside(None);
    };
    let Value::String(ceiling) = ceiling else {
        return Verdict::Outside(None);
    };
    if granted == ceiling {
        return Verdict::Within;
    }
    let (Some(g), Some(c), Some(image)) = (
        pattern_dfa(&pattern_regexes(field, granted)),
        pattern_dfa(&pattern_regexes(field, ceiling)),
        image_dfa(image_regex(field)),
    ) else {
        return Verdict::Undecided;
    };
    let readable = readable_image_regex(field)
        .and_then(image_dfa)
        .map(|readable| search(&g, &c, &readable));
    let outcome = match readable {
        Some(found @ Search::Witness(_)) => found,
        _ => search(&g, &c, &image),
    };
    match outcome {
        Search::Contained => Verdict::Within,
        Search::Witness(bytes) => {
            let text = untransform(field, &String::from_utf8_lossy(&bytes));
            Verdict::Outside(Some(json_text(&text)))
        }
        Search::TooLarge => Verdict::Undecided,
    }
}

#[derive(Debug)]
enum Search {
    Contained,
    Witness(Vec<u8>),
    TooLarge,
}

/// The order bytes are tried in, so examples read well: letters, digits, other printable ASCII,
/// then the rest.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').collect();
    order.extend((0x20..0x7f).filter(|b: &u8| !b.is_ascii_lowercase() && !b.is_ascii_digit()));
    order.extend((0u8..=255).filter(|b| !(0x20..0x7f).contains(b)));
    order
}

/// Breadth-first search of the product automaton for the shortest string that the grant and the
/// image accept and the ceiling does not.
fn search(g: &Dfa, c: &Dfa, image: &Dfa) -> Search {
    let anchored = start::Config::new().anchored(Anchored::Yes);
    let (Ok(sg), Ok(sc), Ok(si)) = (
        g.start_state(&anchored),
        c.start_state(&anchored),
        image.start_state(&anchored),
    ) else {
        return Search::TooLarge;
    };
    let order = byte_order();
    // Each state remembers how it was reached (parent index and byte) to rebuild the example.
    type Product = (StateID, StateID, StateID);
    let mut nodes: Vec<(Product, Option<(usize, u8)>)> = vec![((sg, sc, si), None)];
    let mut seen: HashSet<Product> = HashSet::from([(sg, sc, si)]);
    let mut queue = VecDeque::from([0usize]);
    while let Some(at) = queue.pop_front() {
        let ((g_state, c_state, i_state), _) = nodes[at];
        let accepted = |dfa: &Dfa, s: StateID| dfa.is_match_state(dfa.next_eoi_state(s));
        if accepted(g, g_state) && accepted(image, i_state) && !accepted(c, c_state) {
            let mut bytes = Vec::new();
            let mut cursor = at;
            while let (_, Some((parent, byte))) = nodes[cursor] {
                bytes.push(byte);
                cursor = parent;
            }
            bytes.reverse();
            return Search::Witness(bytes);
        }
        for &byte in &order {
            let next_g = g.next_state(g_state, byte);
            if g.is_dead_state(next_g) || g.is_quit_state(next_g) {
                continue;
            }
            let next_i = image.next_state(i_state, byte);
            if image.is_dead_state(next_i) || image.is_quit_state(next_i) {
                continue;
            }
            let next_c = c.next_state(c_state, byte);
            let key = (next_g, next_c, next_i);
            if seen.insert(key) {
                if nodes.len() >= MAX_PRODUCT_STATES {
                    return Search::TooLarge;
                }
                nodes.push((key, Some((at, byte))));
                queue.push_back(nodes.len() - 1);
            }
        }
    }
    Search::Contained
}

/// A port pattern as policy applies it to a call's port number.
enum PortPattern {
    /// A number: that port exactly.
    Number(u64),
    /// A glob string: ports whose decimal text it matches.
    Glob(GlobMatcher),
    /// Anything else (a string without glob characters is never equal to a number).
    Nothing,
}

impl PortPattern {
    fn of(value: &Value) -> PortPattern {
        match value {
            Value::Number(n) => n.as_u64().map_or(PortPattern::Nothing, PortPattern::Number),
            Value::String(s) if is_glob(s) => GlobBuilder::new(s)
                .literal_separator(true)
                .build()
                .map_or(PortPattern::Nothing, |g| {
                    PortPattern::Glob(g.compile_matcher())
                }),
            _ => PortPattern::Nothing,
        }
    }

    fn matches(&self, port: u16) -> bool {
        match self {
            PortPattern::Number(n) => *n == u64::from(port),
            PortPattern::Glob(g) => g.is_match(port.to_string()),
            PortPattern::Nothing => false,
        }
    }
}

fn port_within(granted: &Value, ceiling: &Value) -> Verdict {
    if granted == ceiling && granted.is_number() {
        return Verdict::Within;
    }
    let (g, c) = (PortPattern::of(granted), PortPattern::of(ceiling));
    let outside = match g {
        PortPattern::Number(n) => u16::try_from(n).ok().filter(|&p| !c.matches(p)),
        PortPattern::Nothing => None,
        PortPattern::Glob(_) => (0..=u16::MAX).find(|&p| g.matches(p) && !c.matches(p)),
    };
    match outside {
        Some(port) => Verdict::Outside(Some(port.to_string())),
        None => Verdict::Within,
    }
}

fn json_text(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether grant scope `grant` is within ceiling scope `ceiling`.
    fn within(grant: Value, ceiling: Value) -> bool {
        check_within(&[grant], &[ceiling]).is_ok()
    }

    /// The refusal of `grant` against `ceiling` (a list of scopes).
    fn refusal(grant: Value, ceiling: Value) -> String {
        let Value::Array(ceiling) = ceiling else {
            panic!("the ceiling is an array");
        };
        check_within(&[grant], &ceiling).unwrap_err().message
    }

    // --- Exact values and globs ---------------------------------------------------------------

    #[test]
    fn an_identical_scope_is_within() {
        assert!(within(
            json!({"host": "tool", "tool": "read_*"}),
            json!({"host": "tool", "tool": "read_*"})
        ));
        assert!(within(json!({"host": "tool"}), json!({"host": "tool"})));
    }

    #[test]
    fn an_exact_value_is_within_a_glob_that_matches_it() {
        assert!(within(
            json!({"tool": "read_file"}),
            json!({"tool": "read_*"})
        ));
        assert!(!within(
            json!({"tool": "write_file"}),
            json!({"tool": "read_*"})
        ));
    }

    #[test]
    fn a_narrower_glob_is_within_a_wider_one_and_not_the_other_way_round() {
        assert!(within(
            json!({"tool": "read_file_*"}),
            json!({"tool": "read_*"})
        ));
        assert!(!within(
            json!({"tool": "read_*"}),
            json!({"tool": "read_file_*"})
        ));
        assert!(!within(json!({"tool": "*"}), json!({"tool": "read_*"})));
        assert!(within(json!({"tool": "read_*"}), json!({"tool": "*"})));
    }

    #[test]
    fn an_exact_value_that_looks_like_no_glob_is_only_itself() {
        assert!(!within(
            json!({"tool": "read_file"}),
            json!({"tool": "read_files"})
        ));
        assert!(within(json!({"method": "GET"}), json!({"method": "GET"})));
        assert!(
            !within(json!({"method": "GET"}), json!({"method": "get"})),
            "case matters"
        );
    }

    // --- `*` and `**` -----------------------------------------------------------------------------

    #[test]
    fn star_stays_within_one_path_segment_and_double_star_crosses_them() {
        assert!(within(json!({"path": "/v1/*"}), json!({"path": "/v1/**"})));
        assert!(!within(json!({"path": "/v1/**"}), json!({"path": "/v1/*"})));
        assert!(within(
            json!({"path": "/v1/items/*/tags"}),
            json!({"path": "/v1/**"})
        ));
        assert!(!within(
            json!({"path": "/v1/a/b"}),
            json!({"path": "/v1/*"})
        ));
        assert!(within(json!({"path": "/v1/a"}), json!({"path": "/v1/*"})));
    }

    #[test]
    fn double_star_alone_matches_everything() {
        assert!(within(
            json!({"path": "/anything/at/all"}),
            json!({"path": "**"})
        ));
        assert!(within(json!({"path": "/v1/**"}), json!({"path": "**"})));
        assert!(
            !within(json!({"path": "**"}), json!({"path": "/**"})),
            "\"x\" has no leading /"
        );
    }

    // --- `?`, classes and braces ------------------------------------------------------------------

    #[test]
    fn question_mark_is_one_character_and_not_a_separator() {
        assert!(within(json!({"tool": "read_?"}), json!({"tool": "read_*"})));
        assert!(!within(
            json!({"tool": "read_*"}),
            json!({"tool": "read_?"})
        ));
        assert!(within(json!({"tool": "read_a"}), json!({"tool": "read_?"})));
        assert!(!within(
            json!({"path": "/v1?x"}),
            json!({"path": "/v1[a-z]x"})
        ));
        assert!(
            !within(json!({"path": "/a/b"}), json!({"path": "/a?b"})),
            "? does not match /"
        );
    }

    #[test]
    fn classes_are_sets_of_characters() {
        assert!(within(
            json!({"tool": "read_[ab]"}),
            json!({"tool": "read_*"})
        ));
        assert!(within(
            json!({"tool": "read_[a-c]x"}),
            json!({"tool": "read_*x"})
        ));
        let m = refusal(json!({"tool": "[a-d]_x"}), json!([{"tool": "{a,b,c}_*"}]));
        assert!(m.ends_with("it would allow \"tool\" \"d_x\""), "{m}");
        let m = refusal(json!({"tool": "?"}), json!([{"tool": "[!a]"}]));
        assert!(m.ends_with("it would allow \"tool\" \"a\""), "{m}");
    }

    #[test]
    fn braces_are_alternatives_and_every_one_must_fit() {
        assert!(within(
            json!({"tool": "{read,list}_x"}),
            json!({"tool": "*_x"})
        ));
        assert!(within(
            json!({"tool": "{read,list}_*"}),
            json!({"tool": "*"})
        ));
        assert!(within(
            json!({"tool": "read_x"}),
            json!({"tool": "{read,list}_*"})
        ));
        let m = refusal(
            json!({"tool": "{read,delete}_x"}),
            json!([{"tool": "read_*"}]),
        );
        assert!(m.ends_with("it would allow \"tool\" \"delete_x\""), "{m}");
    }

    // --- Separators: "." for host, "/" elsewhere ----------------------------------------------

    #[test]
    fn in_hosts_star_stays_within_one_label() {
        assert!(within(
            json!({"host": "api.example.com"}),
            json!({"host": "*.example.com"})
        ));
        assert!(!within(
            json!({"host": "a.b.example.com"}),
            json!({"host": "*.example.com"})
        ));
        assert!(within(
            json!({"host": "*.example.com"}),
            json!({"host": "*.*.com"})
        ));
        assert!(!within(
            json!({"host": "*.example.com"}),
            json!({"host": "*.com"})
        ));
    }

    #[test]
    fn in_hosts_double_star_spans_labels() {
        assert!(within(
            json!({"host": "a.b.example.com"}),
            json!({"host": "**.example.com"})
        ));
        assert!(within(
            json!({"host": "*.example.com"}),
            json!({"host": "**.example.com"})
        ));
        assert!(!within(
            json!({"host": "**.example.com"}),
            json!({"host": "*.example.com"})
        ));
    }

    #[test]
    fn a_dot_separates_only_in_hosts_and_a_slash_only_elsewhere() {
        // tool names are "/"-separated: "*" crosses dots there.
        assert!(within(json!({"tool": "a.b.c"}), json!({"tool": "a*"})));
        assert!(!within(json!({"host": "a.b"}), json!({"host": "a*"})));
        // and "/" separates tool names but not hosts.
        assert!(!within(json!({"tool": "a/b"}), json!({"tool": "a*"})));
        assert!(within(json!({"host": "a/b"}), json!({"host": "a*"})));
    }

    // --- Fields --------------------------------------------------------------------------------

    #[test]
    fn a_field_the_ceiling_names_and_the_grant_leaves_out_is_broader_and_refused() {
        assert!(!within(
            json!({"host": "tool"}),
            json!({"host": "tool", "tool": "read_*"})
        ));
        let m = refusal(
            json!({"host": "tool"}),
            json!([{"host": "tool", "tool": "read_*"}]),
        );
        assert_eq!(
            m,
            "scopes[0]: \"tool\": any value (the scope does not name it) is not within the ceiling \
             (closest: {\"host\":\"tool\",\"tool\":\"read_*\"})"
        );
    }

    #[test]
    fn a_field_the_grant_adds_only_narrows_it() {
        assert!(within(
            json!({"host": "tool", "tool": "read_x", "method": "POST"}),
            json!({"host": "tool"})
        ));
        assert!(
            within(json!({"host": "api", "path": "/v1/x"}), json!({})),
            "an empty ceiling scope allows everything"
        );
    }

    // --- Ports ---------------------------------------------------------------------------------

    #[test]
    fn ports_are_numbers_or_globs_over_their_decimal_text() {
        assert!(within(json!({"port": 8080}), json!({"port": 8080})));
        assert!(!within(json!({"port": 8081}), json!({"port": 8080})));
        assert!(within(json!({"port": 8080}), json!({"port": "80*"})));
        assert!(!within(json!({"port": "80*"}), json!({"port": 8080})));
        assert!(within(json!({"port": "808?"}), json!({"port": "80*"})));
        assert!(within(json!({"port": "{80,443}"}), json!({"port": "*"})));
        assert!(!within(json!({"port": 443}), json!({"port": "80*"})));
        assert!(within(
            json!({"port": "{80,8080}"}),
            json!({"port": "{80,8080,443}"})
        ));
    }

    #[test]
    fn a_port_refusal_names_a_port_the_grant_would_open() {
        let m = refusal(json!({"port": "80*"}), json!([{"port": 8080}]));
        assert!(m.ends_with("; it would allow \"port\" 80"), "{m}");
    }

    #[test]
    fn a_port_string_without_glob_characters_matches_no_port() {
        // Policy compares "80" with the number 80: never equal. As a ceiling it allows nothing...
        assert!(!within(json!({"port": 80}), json!({"port": "80"})));
        // ...and as a grant it asks for nothing, which any ceiling contains.
        assert!(within(json!({"port": "80"}), json!({"port": 443})));
    }

    // --- Messages --------------------------------------------------------------------------------

    #[test]
    fn the_refusal_names_the_excess_the_closest_ceiling_scope_and_an_example() {
        let m = refusal(
            json!({"host": "tool", "tool": "delete_*"}),
            json!([{"host": "db"}, {"host": "tool", "tool": "read_*"}]),
        );
        assert_eq!(
            m,
            "scopes[0]: \"tool\": \"delete_*\" is not within the ceiling \
             (closest: {\"host\":\"tool\",\"tool\":\"read_*\"}); it would allow \"tool\" \"delete_\""
        );
    }

    #[test]
    fn the_refusal_names_the_scope_at_fault() {
        let err = check_within(
            &[
                json!({"host": "tool", "tool": "read_a"}),
                json!({"host": "other"}),
            ],
            &[json!({"host": "tool"})],
        )
        .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.field(), "scopes[1]");
        assert!(
            err.message.starts_with("scopes[1]: \"host\": \"other\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn host_examples_are_shown_with_their_dots() {
        let m = refusal(
            json!({"host": "*.*.com"}),
            json!([{"host": "*.example.com"}]),
        );
        assert!(m.contains("it would allow \"host\" \"a.a.com\""), "{m}");
    }

    #[test]
    fn an_empty_ceiling_allows_nothing() {
        let m = refusal(json!({"host": "tool"}), json!([]));
        assert_eq!(
            m,
            "scopes[0]: the agent's ceiling is empty, so nothing can be granted"
        );
    }

    #[test]
    fn any_one_ceiling_scope_suffices() {
        assert!(
            check_within(
                &[
                    json!({"host": "db", "method": "GET"}),
                    json!({"host": "tool", "tool": "read_x"})
                ],
                &[
                    json!({"host": "tool", "tool": "read_*"}),
                    json!({"host": "db"})
                ],
            )
            .is_ok()
        );
    }

    // --- Odd patterns ----------------------------------------------------------------------------

    #[test]
    fn a_glob_always_matches_its_own_text_too() {
        // Policy compares a pattern with the value for equality before globbing, so a grant of
        // "[ab]x" also allows a tool literally named "[ab]x": within "{a,b}x" only if the ceiling
        // admits that text too, as "*x" or an escaped alternative do.
        let m = refusal(json!({"tool": "[ab]x"}), json!([{"tool": "{a,b}x"}]));
        assert!(
            m.ends_with("it would allow \"tool\" \"[ab]x\" (a pattern also matches its own text)"),
            "{m}"
        );
        assert!(within(
            json!({"tool": "[ab]x"}),
            json!({"tool": "{a,b,\\[ab\\]}x"})
        ));
        assert!(within(json!({"tool": "[ab]x"}), json!({"tool": "*x"})));
        assert!(!within(
            json!({"tool": "{read,list}_*"}),
            json!({"tool": "{list,read}_*"})
        ));
    }

    #[test]
    fn a_ceiling_glob_that_does_not_compile_matches_only_its_own_text() {
        assert!(within(json!({"tool": "read_["}), json!({"tool": "read_["})));
        assert!(!within(
            json!({"tool": "read_a"}),
            json!({"tool": "read_["})
        ));
    }

    #[test]
    fn escaped_metacharacters_are_literal() {
        // The pattern a\* matches the text "a*" (and its own text), nothing else.
        assert!(!within(json!({"tool": "a*"}), json!({"tool": "a\\*"})));
        assert!(within(json!({"tool": "a\\*"}), json!({"tool": "a*"})));
    }

    #[test]
    fn grants_are_refused_globs_that_do_not_compile() {
        assert!(
            check_glob("tool", "read_[")
                .unwrap_err()
                .contains("not a valid glob")
        );
        assert!(check_glob("tool", "read_{a,b").is_err());
        assert!(check_glob("tool", "read_*").is_ok());
        assert!(check_glob("tool", "read_x").is_ok());
        assert!(check_glob("host", "*.example.com").is_ok());
    }

    // --- Sound but incomplete (documented refusals) ---------------------------------------------

    #[test]
    fn sound_but_incomplete_a_scope_covered_only_by_two_ceiling_scopes_together_is_refused() {
        assert!(
            check_within(
                &[json!({"tool": "{read,list}_x"})],
                &[json!({"tool": "read_*"}), json!({"tool": "list_*"})],
            )
            .is_err()
        );
    }

    #[test]
    fn sound_but_incomplete_a_scope_matching_no_call_is_still_checked_field_by_field() {
        // "port": "80" matches no call, so this scope allows nothing; it is refused anyway
        // because its tool is broader than the ceiling's.
        assert!(!within(
            json!({"port": "80", "tool": "*"}),
            json!({"tool": "read_*"})
        ));
    }
}
