//! Webhooks: the person in the loop hears when they are needed and when it is over.
//!
//! `[[webhooks]]` in the config: `url`, `secret`, optional `events` (default: all) and
//! optional `format = "slack"`. For every status change this instance makes to
//! `awaiting_approval`, `completed`, `failed`, `rejected` or `cancelled`, each matching
//! webhook gets a POST of JSON `{"event", "request_id", "status", "text", "requester",
//! "url", "at"}` (`url`: the request's console page) signed with
//! `X-Chiffon-Signature: sha256=<hex HMAC-SHA256 of the body keyed with the secret>`;
//! `format = "slack"` posts `{"text": …}` instead (Slack's incoming-webhook body).
//!
//! Delivery never blocks the engine: the notifier reads the engine's bounded broadcast of
//! status changes (a lagging notifier loses the oldest and counts them). Each webhook has
//! its own sender, which posts its events one at a time in the order the changes were made
//! (a request's `completed` never arrives before its `awaiting_approval`), with a bounded
//! queue of [`QUEUE_PER_HOOK`] (beyond it events are dropped and counted as lagged); a
//! failed POST (connection error, 5xx, 429) is retried with exponential backoff,
//! [`MAX_ATTEMPTS`] times in all. Outcomes are counted for `/metrics` and failures logged
//! (without the secret).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chiffon_core::engine::Engine;
use chiffon_core::model::{Request, RequestStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events waiting for one webhook's sender.
pub const QUEUE_PER_HOOK: usize = 256;
/// Tries per delivery (the first one included).
pub const MAX_ATTEMPTS: u32 = 5;
/// Time one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// The events a webhook may subscribe to.
pub const EVENTS: [&str; 5] = [
    "request.awaiting_approval",
    "request.completed",
    "request.failed",
    "request.rejected",
    "request.cancelled",
];

/// The body format of a webhook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Chiffon's JSON event.
    #[default]
    Json,
    /// `{"text": "…"}` for a Slack (or Mattermost, Rocket.Chat) incoming webhook.
    Slack,
}

/// One `[[webhooks]]` entry.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// HMAC-SHA256 key of `X-Chiffon-Signature`.
    pub secret: String,
    /// Events to send; unset: all of [`EVENTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub format: WebhookFormat,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &url_host(&self.url))
            .field("secret", &"[REDACTED]")
            .field("events", &self.events)
            .field("format", &self.format)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks the URL's scheme and the event names; the message names the problem, never
    /// the secret.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err("webhooks.url must start with http:// or https://".into());
        }
        if self.secret.trim().is_empty() {
            return Err("webhooks.secret must not be empty".into());
        }
        for e in self.events.iter().flatten() {
            if !EVENTS.contains(&e.as_str()) {
                return Err(format!(
                    "webhooks.events: unknown event `{}` (known: {})",
                    e.escape_debug(),
                    EVENTS.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn wants(&self, event: &str) -> bool {
        self.events
            .as_ref()
            .is_none_or(|list| list.iter().any(|e| e == event))
    }
}

/// This process's delivery counters.
pub static METRICS: std::sync::LazyLock<Arc<WebhookMetrics>> =
    std::sync::LazyLock::new(|| Arc::new(WebhookMetrics::default()));

/// Delivery counters, shown by `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Status changes the notifier fell too far behind to see.
    pub lagged: AtomicU64,
}

/// The event name of a status, when it is one webhooks hear about.
pub fn event_of(status: RequestStatus) -> Option<&'static str> {
    Some(match status {
        RequestStatus::AwaitingApproval => "request.awaiting_approval",
        RequestStatus::Completed => "request.completed",
        RequestStatus::Failed => "request.failed",
        RequestStatus::Rejected => "request.rejected",
        RequestStatus::Cancelled => "request.cancelled",
        _ => return None,
    })
}

/// The host of a webhook URL, for logs: the path of many webhook URLs (Slack's) is itself
/// the credential, so it is never logged.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

/// `sha256=` + hex HMAC-SHA256 of `body` keyed with `secret` (RFC 2104).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(chiffon_core::audit::chain::hmac_sha256(secret, body))
    )
}

/// The body one webhook gets for `request` entering its status.
pub fn body(hook: &WebhookConfig, event: &str, request: &Request, console: &str) -> Vec<u8> {
    let url = format!(
        "{}/ui/request/{}",
        console.trim_end_matches('/'),
        request.id
    );
    let v = match hook.format {
        WebhookFormat::Json => serde_json::json!({
            "event": event,
            "request_id": request.id,
            "status": request.status,
            "text": request.text,
            "requester": request.requester,
            "url": url,
            "at": request.updated_at,
        }),
        WebhookFormat::Slack => {
            let what = match request.status {
                RequestStatus::AwaitingApproval => "awaits your approval",
                RequestStatus::Completed => "completed",
                RequestStatus::Failed => "failed",
                RequestStatus::Rejected => "was rejected",
                RequestStatus::Cancelled => "was cancelled",
                _ => "changed",
            };
            // Slack reads `<`, `>` and `&` as markup: escape them in the request's text.
            let text: String = request
                .text
                .chars()
                .take(300)
                .collect::<String>()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            serde_json::json!({
                "text": format!("Chiffon request {what}: \"{text}\" (by {}) <{url}|open>", request.requester),
            })
        }
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Runs the notifier until `stop`: reads the engine's status changes and delivers them.
pub async fn run(
    engine: Engine,
    hooks: Vec<WebhookConfig>,
    console: String,
    metrics: Arc<WebhookMetrics>,
    stop: CancellationToken,
) {
    if hooks.is_empty() {
        return;
    }
    let mut changes = engine.subscribe_status_changes();
    let client = match reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: no HTTP client; webhooks are off");
            return;
        }
    };
    let hooks = Arc::new(hooks);
    let tasks = tokio_util::task::TaskTracker::new();
    // One sender per webhook: its events in order, one POST at a time.
    let senders: Vec<tokio::sync::mpsc::Sender<(&'static str, uuid::Uuid, Vec<u8>)>> = (0..hooks
        .len())
        .map(|i| {
            let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE_PER_HOOK);
            let (client, hooks, metrics, stop) =
                (client.clone(), hooks.clone(), metrics.clone(), stop.clone());
            tasks.spawn(async move {
                while let Some((event, id, payload)) = rx.recv().await {
                    deliver(&client, &hooks[i], event, id, payload, &metrics, &stop).await;
                }
            });
            tx
        })
        .collect();
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => break,
            r = changes.recv() => match r {
                Ok(r) => r,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics.lagged.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(missed = n, "webhooks: fell behind; some status changes were not sent");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        let Some(event) = event_of(request.status) else {
            continue;
        };
        for (i, hook) in hooks.iter().enumerate() {
            if !hook.wants(event) {
                continue;
            }
            let payload = body(hook, event, &request, &console);
            if senders[i].try_send((event, request.id, payload)).is_err() {
                metrics.lagged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    host = url_host(&hook.url),
                    event,
                    "webhooks: this webhook's queue is full; the event was not sent"
                );
            }
        }
    }
    drop(senders);
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

async fn deliver(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    event: &str,
    request_id: uuid::Uuid,
    payload: Vec<u8>,
    metrics: &WebhookMetrics,
    stop: &CancellationToken,
) {
    let sig = signature(hook.secret.as_bytes(), &payload);
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            metrics.retries.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_millis(500 * 2u64.pow(attempt - 2));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let sent = client
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("chiffon/", env!("CARGO_PKG_VERSION")))
            .header("x-chiffon-event", event)
            .header("x-chiffon-signature", &sig)
            .body(payload.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                metrics.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%request_id, event, host = url_host(&hook.url), "webhook delivered");
                return;
            }
            // A 4xx other than 408/429 will not get better by trying again.
            Ok(r)
                if r.status().is_client_error()
                    && r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS
                    && r.status() != reqwest::StatusCode::REQUEST_TIMEOUT =>
            {
                last = format!("answered {}", r.status());
                break;
            }
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = e.without_url().to_string(),
        }
    }
    metrics.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%request_id, event, host = url_host(&hook.url), error = %last, "webhook not delivered");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let sig = signature(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            sig,
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn only_the_host_of_a_webhook_url_is_logged() {
        assert_eq!(
            url_host("https://hooks.slack.com/services/T0/B0/SECRETPATH?x=1"),
            "hooks.slack.com"
        );
        assert_eq!(url_host("http://user:pw@127.0.0.1:9/hook"), "127.0.0.1:9");
    }

    #[test]
    fn config_is_checked_and_never_shows_the_secret() {
        let hook = WebhookConfig {
            url: "ftp://x".into(),
            secret: "very-secret-value".into(),
            events: None,
            format: WebhookFormat::Json,
        };
        assert!(hook.validate().is_err());
        assert!(!format!("{hook:?}").contains("very-secret-value"));
        let bad = WebhookConfig {
            url: "https://hooks.example/x".into(),
            events: Some(vec!["request.exploded".into()]),
            ..hook
        };
        assert!(bad.validate().unwrap_err().contains("request.exploded"));
    }
}
