//! How the command ends when something failed: one line on stderr that says each cause
//! once and, where one helps, what to do; and silence when stdout's reader went away.

use std::io::ErrorKind;
use std::path::Path;

use chiffon_core::catalog::CatalogError;
use chiffon_core::store::StoreError;
use chiffon_core::transport::TransportError;
use chiffon_server::app::StartError;

/// The exit status when stdout's reader is gone: what a shell reports for a program that
/// SIGPIPE killed (128 + 13), as `seq 1000000 | head -1` does.
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// `print!` panics when stdout's reader is gone (Rust ignores SIGPIPE): end quietly then,
/// instead of a panic message.
pub fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("Broken pipe") {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        default(info);
    }));
}

/// Prints `e` as one line (with a hint where one helps) and exits non-zero.
pub fn exit_with(e: &anyhow::Error) -> ! {
    if is_broken_pipe(e) {
        std::process::exit(BROKEN_PIPE_EXIT);
    }
    let mut line = one_line(e);
    if let Some(h) = hint(e) {
        line.push_str("; ");
        line.push_str(&h);
    }
    eprintln!("chiffon: {}", chiffon_server::redact_for_logs(&line));
    std::process::exit(1);
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                .is_some_and(|k| k == ErrorKind::BrokenPipe)
    })
}

/// The chain of causes joined by `: `, each said once: many errors already include their
/// source's message in their own, and printing the chain as well said it again.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

/// What to do about the most common ways of failing to start.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(StartError::Bind { source, .. }) = cause.downcast_ref::<StartError>() {
            if source.kind() == ErrorKind::AddrInUse {
                return Some(
                    "another program listens there: pick another address with `--bind 127.0.0.1:PORT` (or CHIFFON_BIND), and give clients `--server http://127.0.0.1:PORT` (or CHIFFON_URL)"
                        .into(),
                );
            }
        }
        if let Some(CatalogError::Invalid { path, .. }) = cause.downcast_ref::<CatalogError>() {
            if !Path::new(path).exists() {
                return Some(
                    "point `--playbooks DIR` (or CHIFFON_PLAYBOOKS) at the action catalog, the repository's `playbooks/` folder"
                        .into(),
                );
            }
        }
        let service = cause.downcast_ref::<StoreError>().is_some()
            || cause.downcast_ref::<TransportError>().is_some()
            || matches!(
                cause.downcast_ref::<StartError>(),
                Some(StartError::Store { .. } | StartError::Transport { .. })
            );
        if service {
            let text = e.chain().map(|c| c.to_string()).collect::<String>();
            let text = text.to_lowercase();
            if text.contains("vhost") || text.contains("virtual host") {
                return Some(
                    "the RabbitMQ vhost is missing: `scripts/services.sh` creates it (and starts RabbitMQ)"
                        .into(),
                );
            }
            if text.contains("does not exist") && text.contains("database") {
                return Some(
                    "the PostgreSQL database is missing: `scripts/services.sh` creates it (and starts PostgreSQL)"
                        .into(),
                );
            }
            if text.contains("connection refused") {
                return Some(
                    "is the service running? `scripts/services.sh` starts PostgreSQL and RabbitMQ"
                        .into(),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let inner = std::io::Error::new(ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(StartError::Bind {
            addr: "127.0.0.1:1".into(),
            source: inner,
        })
        .context("starting");
        assert_eq!(
            one_line(&e),
            "starting: cannot listen on 127.0.0.1:1: no such file"
        );
    }
}
