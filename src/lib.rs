//! magicmx: one node of a network of throttling relay MX servers.
//!
//! Data flows one way: `smtp` accepts mail (asking `dns` whether a recipient
//! domain is ours), `spool` makes it durable before the `250`, and `relay`
//! takes due messages from the spool and delivers them to the domain's real
//! MX. `run` wires the parts together under one shutdown signal.

pub mod config;
pub mod dns;
pub mod relay;
pub mod smtp;
pub mod spool;
