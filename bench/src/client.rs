//! The HTTP calls the scenarios make, over one keep-alive connection pool.

use anyhow::{bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::load::Outcome;

#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(base_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .tcp_nodelay(true)
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            base: format!("{base_url}/api/v1"),
        })
    }

    /// A setup call that must succeed; answers the JSON body.
    async fn must(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {path}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path} answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<String> {
        let body = self
            .must(
                Method::POST,
                "/auth/login",
                None,
                json!({"email": email, "password": password}),
            )
            .await?;
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .context("login answered no access_token")
    }

    pub async fn register(&self, email: &str, password: &str, name: &str) -> Result<()> {
        self.must(
            Method::POST,
            "/auth/register",
            None,
            json!({"email": email, "password": password, "name": name}),
        )
        .await?;
        Ok(())
    }

    pub async fn create_product(
        &self,
        token: &str,
        sku: &str,
        name: &str,
        description: &str,
        price: i64,
        stock: u32,
    ) -> Result<(Uuid, i64)> {
        let body = self
            .must(
                Method::POST,
                "/products",
                Some(token),
                json!({
                    "sku": sku,
                    "name": name,
                    "description": description,
                    "price": {"amount": price, "currency": "EUR"},
                    "stock": stock,
                }),
            )
            .await?;
        let id = body["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .context("product creation answered no id")?;
        Ok((id, body["position"].as_i64().unwrap_or(0)))
    }

    pub async fn restock(&self, token: &str, product: Uuid, quantity: u32) -> Outcome {
        let request = self
            .http
            .post(format!("{}/products/{product}/restock", self.base))
            .bearer_auth(token)
            .json(&json!({ "quantity": quantity }));
        answer(request, StatusCode::OK).await
    }

    pub async fn place_order(&self, token: &str, product: Uuid, quantity: u32) -> Outcome {
        let request = self
            .http
            .post(format!("{}/orders", self.base))
            .bearer_auth(token)
            .json(&json!({ "lines": [{"product_id": product, "quantity": quantity}] }));
        answer(request, StatusCode::CREATED).await
    }

    pub async fn get_product(&self, product: Uuid) -> Outcome {
        let request = self.http.get(format!("{}/products/{product}", self.base));
        answer(request, StatusCode::OK).await
    }

    /// `GET /products?<query>`.
    pub async fn list_products(&self, query: &str) -> Outcome {
        let request = self.http.get(format!("{}/products?{query}", self.base));
        answer(request, StatusCode::OK).await
    }
}

/// Sends a measured request: the expected status is success, a 409 (a business rule's
/// code in the error envelope) is a refusal, anything else a failure.
async fn answer(request: reqwest::RequestBuilder, expected: StatusCode) -> Outcome {
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(format!("transport: {error}")),
    };
    let status = response.status();
    let position = response
        .headers()
        .get("x-event-position")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok());
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return Outcome::Failed(format!("reading the body: {error}")),
    };
    if status == expected {
        return Outcome::Ok(position);
    }
    let code = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if status == StatusCode::CONFLICT {
        Outcome::Refused(code)
    } else {
        Outcome::Failed(format!("{status} {code}"))
    }
}
