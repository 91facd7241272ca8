//! Plain-text tables and terminal-safe text for the CLI's output.
//!
//! Everything shown comes from the server and, through decision records, partly from agents: a
//! tool name or path could carry escape sequences. [`clean`] makes every control character
//! visible instead of letting it reach the terminal.

use std::fmt::Write as _;

/// Replaces control characters (including newlines and ESC) by their escaped form, e.g. `\u{1b}`.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Multi-line text made safe for a terminal: each line cleaned, continuation lines indented by `indent`.
pub fn clean_lines(s: &str, indent: &str) -> String {
    s.lines()
        .map(|line| clean(line.trim_end_matches('\r')))
        .collect::<Vec<_>>()
        .join(&format!("\n{indent}"))
}

/// `spiffe://td/agent/x` → `agent/x`; anything else as it is.
pub fn short_id(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or(id, |(_, path)| path)
}

/// The value, or `-` for a cell with none.
pub fn or_dash(v: Option<&String>) -> String {
    v.cloned().unwrap_or_else(|| "-".to_owned())
}

/// A table with a header row; columns are as wide as their widest cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are cleaned of control characters, missing cells are blank.
    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        let mut row: Vec<String> = cells.into_iter().map(|c| clean(&c)).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let _ = write!(line, "{cell:<w$}");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The first `n` characters of `s` (for digests and other long identifiers).
pub fn prefix(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_drop_the_scheme_and_trust_domain() {
        assert_eq!(short_id("spiffe://td/service/tool"), "service/tool");
        assert_eq!(short_id("spiffe://td"), "spiffe://td");
        assert_eq!(short_id("weird"), "weird");
    }

    #[test]
    fn columns_align_to_the_widest_cell_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "STATUS", "OWNER"]);
        t.row(["research".into(), "active".into(), "alice".into()]);
        t.row(["a".into(), "suspended".into(), String::new()]);
        assert_eq!(
            t.render(),
            "NAME      STATUS     OWNER\n\
             research  active     alice\n\
             a         suspended\n"
        );
    }

    #[test]
    fn a_table_without_rows_is_its_header() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(clean("plain ünïcode"), "plain ünïcode");
        assert_eq!(clean("a\u{1b}[31mred\nx"), "a\\u{1b}[31mred\\nx");
        let mut t = Table::new(&["REASON"]);
        t.row(["line1\nline2".into()]);
        assert_eq!(t.render(), "REASON\nline1\\nline2\n");
        assert_eq!(
            clean_lines("error here\n  --> p.rego:3\r\n\u{7}", "  "),
            "error here\n    --> p.rego:3\n  \\u{7}"
        );
    }

    #[test]
    fn wide_characters_count_as_one_column_each() {
        let mut t = Table::new(&["K", "V"]);
        t.row(["é".into(), "1".into()]);
        t.row(["ab".into(), "2".into()]);
        assert_eq!(t.render(), "K   V\né   1\nab  2\n");
    }

    #[test]
    fn prefix_cuts_on_character_boundaries() {
        assert_eq!(prefix("abcdef", 3), "abc");
        assert_eq!(prefix("ab", 3), "ab");
        assert_eq!(prefix("ééé", 2), "éé");
    }
}
