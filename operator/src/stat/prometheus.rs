//! The HTTP edge to Prometheus: instant queries (`GET /api/v1/query`), answers parsed into
//! [`Sample`]s. Plain `http://` only (a port-forward or in-cluster Service); a Prometheus behind
//! TLS or auth needs a proxy in front.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Query, Sample, Stat, build, queries};

/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why Prometheus gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("{0:?} is not an http:// URL such as http://127.0.0.1:9090")]
    BadUrl(String),
    #[error("cannot reach Prometheus at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Prometheus refused the query {query:?}: {detail}")]
    Query { query: String, detail: String },
}

/// A Prometheus server.
#[derive(Clone)]
pub struct Prometheus {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Prometheus {
    pub fn new(url: &str) -> Result<Self, PromError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.parse::<http::Uri>().is_err() {
            return Err(PromError::BadUrl(url.to_string()));
        }
        Ok(Self {
            base,
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        })
    }

    /// One instant query, evaluated at `time` (Unix seconds): the queries of one view share it,
    /// so a success ratio divides rates of the same instant.
    pub async fn query(&self, promql: &str, time: f64) -> Result<Vec<Sample>, PromError> {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .append_pair("time", &format!("{time:.3}"))
            .finish();
        let uri = format!("{}/api/v1/query?{q}", self.base);
        let unreachable = |detail: String| PromError::Unreachable {
            url: self.base.clone(),
            detail,
        };
        let uri: http::Uri = uri
            .parse()
            .map_err(|_| PromError::BadUrl(self.base.clone()))?;
        let resp = tokio::time::timeout(QUERY_TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        parse_answer(&body).map_err(|detail| PromError::Query {
            query: promql.to_string(),
            detail,
        })
    }

    /// Every query of the view over `window`, into a [`Stat`].
    pub async fn stat(&self, window: &str) -> Result<Stat, PromError> {
        let time = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        let mut results: BTreeMap<Query, Vec<Sample>> = BTreeMap::new();
        for (q, promql) in queries(window) {
            results.insert(q, self.query(&promql, time).await?);
        }
        Ok(build(window, &results))
    }
}

/// Parses an instant-query answer (`resultType: vector`).
pub fn parse_answer(body: &[u8]) -> Result<Vec<Sample>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus API answer: {e}"))?;
    if v["status"] != "success" {
        return Err(v["error"]
            .as_str()
            .unwrap_or("status is not success")
            .to_string());
    }
    if v["data"]["resultType"] != "vector" {
        return Err(format!(
            "expected a vector, got {}",
            v["data"]["resultType"]
        ));
    }
    let mut out = Vec::new();
    for r in v["data"]["result"].as_array().into_iter().flatten() {
        let labels = r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let value = r["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| format!("a sample without a value: {r}"))?;
        out.push(Sample { labels, value });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vectors_and_reports_errors() {
        let ok = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"app":"frontend","namespace":"shop"},"value":[1700000000.1,"2.5"]},
            {"metric":{"app":"x","namespace":"shop"},"value":[1700000000.1,"NaN"]}]}}"#;
        let s = parse_answer(ok).unwrap();
        assert_eq!(s[0].value, 2.5);
        assert!(s[1].value.is_nan());
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        assert_eq!(parse_answer(bad).unwrap_err(), "parse error at char 3");
        assert!(Prometheus::new("https://prom:9090").is_err());
        assert!(Prometheus::new("http://127.0.0.1:9090/").is_ok());
    }
}
