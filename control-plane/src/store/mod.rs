//! The control plane store (SQLite or PostgreSQL).
