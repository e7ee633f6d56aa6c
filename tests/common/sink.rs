//! The SMTP server standing in for a domain's real MX: the crate's own
//! (`magicmx::demo::sink`), shared with the unit tests and `magicmx demo`.

pub use magicmx::demo::sink::{Session, Sink, SinkBuilder, Txn};
