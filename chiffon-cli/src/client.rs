//! The HTTP client of the server's API, and a small Server-Sent Events reader.

use anyhow::{anyhow, Context};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Talks to one server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// An error answer of the API, rendered as one line.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Option<u64>,
    pub message: String,
    pub trace_id: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => {
                let name = u16::try_from(c)
                    .ok()
                    .and_then(chiffon_protocol::ErrorCode::from_code)
                    .map(|c| c.name())
                    .unwrap_or("error");
                write!(f, "{} ({c} {name}): {}", self.status.as_u16(), self.message)?
            }
            None => write!(f, "{}: {}", self.status.as_u16(), self.message)?,
        }
        if let Some(t) = &self.trace_id {
            write!(f, " [trace {t}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// Sends and returns the response if it is a success; errors say which server.
    async fn send(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&body).ok();
        let err = parsed.as_ref().and_then(|v| v.get("error"));
        Err(ApiError {
            status,
            code: err.and_then(|e| e.get("code")).and_then(Value::as_u64),
            message: err
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    let b = body.trim();
                    if b.is_empty() {
                        status.canonical_reason().unwrap_or("error").to_lowercase()
                    } else {
                        b.chars().take(200).collect()
                    }
                }),
            trace_id: err
                .and_then(|e| e.get("trace_id"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        }
        .into())
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        anyhow!(
            "cannot reach the chiffon server at {} ({cause}); start one with `chiffon up` or set --server / CHIFFON_URL",
            self.base
        )
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `method path` with an optional JSON body and returns the status and JSON body
    /// whatever the status (`chiffon mcp` turns API errors into tool errors itself).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        resp.json()
            .await
            .with_context(|| format!("reading the answer of GET {path}"))
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let mut rb = self.request(Method::POST, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = self.send(rb).await?;
        resp.json()
            .await
            .with_context(|| format!("reading the answer of POST {path}"))
    }

    /// Opens an SSE stream.
    pub async fn events(&self, path: &str) -> anyhow::Result<SseReader> {
        let resp = self
            .send(
                self.request(Method::GET, path)
                    .header(reqwest::header::ACCEPT, "text/event-stream"),
            )
            .await?;
        Ok(SseReader {
            resp,
            buf: String::new(),
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Reads events from a streamed `text/event-stream` body.
#[derive(Debug)]
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    /// The next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(ev) = take_event(&mut self.buf) {
                if ev.data.is_empty() && ev.event.is_empty() {
                    continue; // a keep-alive comment
                }
                return Ok(Some(ev));
            }
            match self
                .resp
                .chunk()
                .await
                .context("reading the event stream")?
            {
                Some(bytes) => self
                    .buf
                    .push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n")),
                None => {
                    return Ok(
                        take_event(&mut format!("{}\n\n", self.buf)).filter(|e| !e.data.is_empty())
                    )
                }
            }
        }
    }
}

/// Takes the first complete event (terminated by a blank line) from `buf`.
fn take_event(buf: &mut String) -> Option<SseEvent> {
    let end = buf.find("\n\n")?;
    let block: String = buf[..end].to_string();
    buf.drain(..end + 2);
    let mut ev = SseEvent {
        event: String::new(),
        data: String::new(),
    };
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => ev.event = value.to_string(),
            "data" => {
                if !ev.data.is_empty() {
                    ev.data.push('\n');
                }
                ev.data.push_str(value);
            }
            _ => {}
        }
    }
    if ev.event.is_empty() && !ev.data.is_empty() {
        ev.event = "message".into();
    }
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_comments_and_multiline_data() {
        let mut buf =
            ": keep-alive\n\nevent: status\ndata: {\"a\":1}\n\nevent: output\ndata: x\ndata: y\n\npartial"
                .to_string();
        assert_eq!(
            take_event(&mut buf),
            Some(SseEvent {
                event: String::new(),
                data: String::new()
            })
        );
        assert_eq!(
            take_event(&mut buf),
            Some(SseEvent {
                event: "status".into(),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(take_event(&mut buf).unwrap().data, "x\ny");
        assert_eq!(take_event(&mut buf), None);
        assert_eq!(buf, "partial");
    }
}
