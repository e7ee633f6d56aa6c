//! The in-process DNS server of `magicmx demo`, shared with the tests.

pub use magicmx::demo::dns::{DnsServer, Rec};
