//! A listing query: a SELECT with `AND`-ed filters, an order and a limit, its values bound by
//! number (`$1`, `$2`, …) so the same SQL serves SQLite and PostgreSQL.

use std::fmt::Write as _;

/// A bound value.
pub(super) enum Arg {
    Text(String),
    Int(i64),
}

/// Builds one listing query.
pub(super) struct Select {
    sql: String,
    filters: Vec<String>,
    args: Vec<Arg>,
}

impl Select {
    /// `SELECT columns FROM table`, as given.
    pub(super) fn new(select_from: &str) -> Self {
        Self {
            sql: select_from.to_owned(),
            filters: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds `column op $n` with `arg` bound as `$n`.
    pub(super) fn filter(&mut self, column: &str, op: &str, arg: Arg) {
        self.args.push(arg);
        self.filters
            .push(format!("{column} {op} ${}", self.args.len()));
    }

    /// The SQL, `WHERE` the filters, `ORDER BY order_by LIMIT limit`, and the values to bind in
    /// order (see [`bind_all`]).
    pub(super) fn finish(mut self, order_by: &str, limit: u32) -> (String, Vec<Arg>) {
        if !self.filters.is_empty() {
            self.sql.push_str(" WHERE ");
            self.sql.push_str(&self.filters.join(" AND "));
        }
        self.args.push(Arg::Int(i64::from(limit)));
        let _ = write!(self.sql, " ORDER BY {order_by} LIMIT ${}", self.args.len());
        (self.sql, self.args)
    }
}

/// Binds every [`Arg`] of `$args` to `$query`, in order (a macro: each backend's query type
/// differs, see `on_pool!`).
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                $crate::store::select::Arg::Text(text) => query.bind(text),
                $crate::store::select::Arg::Int(int) => query.bind(int),
            };
        }
        query
    }};
}
pub(super) use bind_all;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_anded_and_numbered_before_the_limit() {
        let mut q = Select::new("SELECT id FROM grants");
        q.filter("agent", "=", Arg::Text("research".into()));
        q.filter("expires_at", ">", Arg::Int(5));
        let (sql, args) = q.finish("created_at DESC, id DESC", 100);
        assert_eq!(
            sql,
            "SELECT id FROM grants WHERE agent = $1 AND expires_at > $2 \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        );
        assert_eq!(args.len(), 3);
        let (sql, _) = Select::new("SELECT id FROM grants").finish("id", 1);
        assert_eq!(sql, "SELECT id FROM grants ORDER BY id LIMIT $1");
    }
}
