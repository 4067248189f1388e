//! What tracing adds to one request on the proxy's request path, in nanoseconds: the sampling
//! decision ([`Tracing::begin`]) with tracing off, at 1 % without a `traceparent`, with an
//! unsampled `traceparent`, and a sampled request's whole span (begin, build, queue). Run with
//! `cargo run --release -p trellis-proxy --example bench-spans`; not run by CI, only compiled.
//!
//! Issue #15 bounds tracing at 1 % to +5 % CPU per request; a request costs the two sidecars
//! about 60 µs of CPU each (`hack/bench-ab.py`), so 5 % is ~3 µs. Whole-process A/B figures on
//! a shared 2-core machine spread by ±25 % per round, far more than that: these per-call
//! figures, each the median of interleaved rounds on one thread, say what the request path
//! itself pays. The exporter's side (batching, encoding, the HTTP round trip) runs off the
//! request path and shows in `perf` profiles of `hack/bench-ab.py` (`PERF=client`).
//!
//! The queue behind the sampled case is real (a collector address where nothing listens):
//! spans it cannot hold are counted as dropped, exactly what a request pays then.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Version};
use opentelemetry::trace::SpanKind;
use prometheus_client::metrics::counter::Counter;
use trellis_proxy::config::TracingSettings;
use trellis_proxy::spans::{Finished, Pod, TRACEPARENT, Tracing};

const ITERS: u32 = 200_000;

/// One request's worth of tracing work, run [`ITERS`] times per round.
type Case<'a> = Box<dyn FnMut() + 'a>;
const ROUNDS: usize = 7;

fn tracing(percent: Option<f64>) -> Tracing {
    let t = Tracing::new(Pod::default(), Counter::default());
    let settings = percent.map(|p| TracingSettings {
        sampling_percent: p,
        collector: "http://127.0.0.1:9/v1/traces".into(),
    });
    t.apply(settings.as_ref(), &BTreeMap::new(), "bench");
    t
}

fn headers(traceparent: Option<&'static str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("backend.shop"));
    h.insert("user-agent", HeaderValue::from_static("bench"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    if let Some(tp) = traceparent {
        h.insert(TRACEPARENT, HeaderValue::from_static(tp));
    }
    h
}

/// Nanoseconds per call of `f`, over [`ITERS`] calls.
fn per_call(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..ITERS {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(ITERS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let off = tracing(None);
    let one = tracing(Some(1.0));
    let all = tracing(Some(100.0));
    let none = headers(None);
    let unsampled = headers(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    ));
    let method = Method::GET;
    let (peer, dst): (Arc<str>, Arc<str>) = (
        "spiffe://cluster.local/ns/shop/sa/backend".into(),
        "backend.shop".into(),
    );
    let finished = Finished {
        kind: SpanKind::Client,
        method: &method,
        authority: "backend.shop:8080",
        path: "/api/items?page=2",
        version: Version::HTTP_11,
        status: 200,
        peer_identity: &peer,
        dst_service: &dst,
        attempts: 1,
        flags: &[],
        events: &[],
        elapsed: Duration::from_micros(250),
    };

    // Neither tracing off nor an unsampled request touches the headers, so each case keeps
    // its own map; a sampled request gets a `traceparent` inserted, removed again for the next.
    let (off, one, all, finished) = (&off, &one, &all, &finished);
    let (mut h_off, mut h_one, mut h_unsampled, mut h_all) =
        (none.clone(), none.clone(), unsampled.clone(), none.clone());
    let mut cases: [(&str, Case); 4] = [
        (
            "tracing off",
            Box::new(move || {
                black_box(off.begin(black_box(&mut h_off)));
            }),
        ),
        (
            "1 %, no traceparent (1 in 100 sampled: span built and queued)",
            Box::new(move || {
                if let Some(span) = one.begin(black_box(&mut h_one)) {
                    span.finish(finished);
                    h_one.remove(TRACEPARENT);
                }
            }),
        ),
        (
            "1 %, unsampled traceparent",
            Box::new(move || {
                black_box(one.begin(black_box(&mut h_unsampled)));
            }),
        ),
        (
            "100 %: begin + finish (span built and queued)",
            Box::new(move || {
                if let Some(span) = all.begin(black_box(&mut h_all)) {
                    span.finish(finished);
                }
                h_all.remove(TRACEPARENT);
            }),
        ),
    ];
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            rows[i].push(per_call(f));
            // Let the export task drain (or drop) what the sampled case queued.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("| case | ns per request (median of {ROUNDS} rounds of {ITERS}) |");
    println!("|---|---|");
    for ((name, _), r) in cases.iter().zip(rows) {
        println!("| {name} | {:.0} |", median(r));
    }
}
