//! # chiffon-core
//!
//! The orchestrator engine of Chiffon, as a library: a request in plain words becomes a
//! validated plan (LLM providers under monthly budgets with fallback, down to an offline
//! planner), passes an approval gate and cost limits, is dispatched step by step to agents
//! that have the resources it needs, and ends recorded in the store, the hash-chained audit
//! log and a git commit.
//!
//! Module map:
//! - [`model`]: requests, plans, steps, statuses and their legal transitions.
//! - [`catalog`]: the action catalog (`playbooks/*/action.toml`) and parameter validation.
//! - [`store`]: the `Store` trait; PostgreSQL and SQLite implementations.
//! - [`transport`]: the `Transport` trait; RabbitMQ and in-process implementations.
//! - [`audit`]: the audit log's hash chain and the git trail.
//! - [`engine`]: the request lifecycle: approval gate, dispatch, results, retries, timeouts.
//! - [`scheduler`]: resource-aware choice of an agent for a step.
//! - [`llm`]: LLM providers with budgets, retries, circuit breakers and fallback.
//! - [`planner`]: request text to a validated plan (LLM or offline), with a plan cache.
//! - [`retry`]: the one backoff policy, shared by step retries and LLM calls.
//! - [`redact`]: the `Redactor` that keeps configured secrets out of stored and shown text.
//!
//! Features: `engine` (in the default set, through `postgres` and `sqlite`) is the
//! orchestrator: [`engine`], [`store`], [`llm`], [`planner`], [`scheduler`], [`audit`], with
//! sqlx, git2 and reqwest. Without it (`default-features = false`) the crate is what an agent
//! needs: [`model`], [`catalog`], [`transport`] (in-process; RabbitMQ with `amqp`) and
//! [`redact`], which is how `chiffon-agent-kit` depends on it.
//!
//! Architecture invariant: this crate never reads environment variables or argv; the
//! binaries build its configuration types and hand them in.

#[cfg(feature = "engine")]
pub mod audit;
pub mod catalog;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod llm;
pub mod model;
#[cfg(feature = "engine")]
pub mod planner;
pub mod redact;
#[cfg(feature = "engine")]
pub mod retry;
#[cfg(feature = "engine")]
pub mod scheduler;
#[cfg(feature = "engine")]
pub mod store;
pub mod transport;
