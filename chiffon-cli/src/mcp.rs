//! `chiffon mcp`: the MCP server of `chiffon_server::mcp` on stdio, its tools calling a
//! server's HTTP API with this command's `--server` and `--token`.

use chiffon_server::mcp::{ApiAnswer, ApiCall, HttpApi};
use reqwest::header::HeaderMap;

use crate::client::Client;

/// The HTTP API of a remote server.
#[derive(Debug)]
pub struct RemoteApi {
    client: Client,
}

impl RemoteApi {
    pub fn new(client: Client) -> Self {
        RemoteApi { client }
    }
}

impl HttpApi for RemoteApi {
    async fn call(&self, call: ApiCall) -> Result<ApiAnswer, String> {
        let method = reqwest::Method::from_bytes(call.method.as_str().as_bytes())
            .map_err(|e| e.to_string())?;
        let (status, body) = self
            .client
            .raw(method, &call.path, call.body.as_ref())
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(ApiAnswer { status, body })
    }

    fn console_url(&self, _caller: &HeaderMap, request_id: &str) -> String {
        format!("{}/ui/request/{request_id}", self.client.base())
    }
}
