//! The audit trail: the hash-chained `audit_log` (through the [`crate::store::Store`]) and
//! one git commit per finished request.

pub mod chain;
pub mod entries;
pub mod event;
pub mod git;
mod pack;

pub use event::AuditEvent;
