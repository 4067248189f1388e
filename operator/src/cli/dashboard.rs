//! `trellis dashboard --prometheus URL`: the live service graph of a cluster, from the
//! Prometheus that scrapes its sidecars, on 127.0.0.1 (see [`crate::dashboard`]).

use std::time::Duration;

use anyhow::Context as _;

use crate::dashboard::{Graph, server};
use crate::stat::prometheus::Prometheus;

/// How often Prometheus is queried for the page.
const REFRESH: Duration = Duration::from_secs(2);

/// Arguments of `trellis dashboard`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prometheus scraping the sidecars, e.g. http://127.0.0.1:9090 (a port-forward).
    #[arg(long, env = "TRELLIS_PROMETHEUS")]
    pub prometheus: String,
    /// 127.0.0.1 port to serve the page on (0: any free port; the URL is printed).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Window rates and quantiles are computed over (a Prometheus duration).
    #[arg(long, default_value = "1m")]
    pub window: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let prom = Prometheus::new(&a.prometheus)?;
    let window_secs = crate::duration::parse(&a.window)
        .map(|d| d.as_secs_f64())
        .with_context(|| format!("--window {:?}", a.window))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = server::bind(a.port)
            .await
            .with_context(|| format!("dashboard port 127.0.0.1:{}", a.port))?;
        println!(
            "Dashboard: {} (from {})",
            server::url(&listener),
            a.prometheus
        );
        let (tx, rx) = tokio::sync::watch::channel(Graph::default());
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(server::serve(listener, rx, stop.clone()));
        let source = format!("Prometheus {}", a.prometheus);
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {}
            }
            let at_ms = jiff::Timestamp::now().as_millisecond();
            let graph = match prom.stat(&a.window).await {
                Ok(stat) => stat.to_graph(&source, at_ms, window_secs),
                Err(e) => Graph {
                    source: source.clone(),
                    at_ms,
                    window_secs,
                    error: Some(e.to_string()),
                    ..tx.borrow().clone()
                },
            };
            tx.send_replace(graph);
        }
        stop.cancel();
        anyhow::Ok(())
    })
}
