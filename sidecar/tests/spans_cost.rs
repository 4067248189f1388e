//! The cost promise of tracing at low sampling rates: deciding that a request is not sampled
//! allocates nothing (no span, no attribute, no header copy), whether the request carries no
//! `traceparent` or an unsampled one. Counted by a counting global allocator, on this thread
//! only (the exporter runs on a thread of its own).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use trellis_proxy::config::TracingSettings;
use trellis_proxy::spans::{Pod, TRACEPARENT, Tracing};

/// Allocations `f` makes on this thread (`allocation-counter` installs the counting allocator).
fn allocations(f: impl FnOnce()) -> u64 {
    allocation_counter::measure(f).count_total
}

fn tracing(percent: f64) -> Tracing {
    let t = Tracing::new(Pod::default(), Counter::default());
    let settings = TracingSettings {
        sampling_percent: percent,
        // Nothing listens: the exporter never gets a batch in this test anyway.
        collector: "127.0.0.1:9".into(),
    };
    t.apply(Some(&settings), &BTreeMap::new(), "shop");
    t
}

#[tokio::test(flavor = "current_thread")]
async fn an_unsampled_request_allocates_nothing() {
    // Sampling on, at a rate no run will hit (a threshold of ~2^17 of 2^64): every request
    // without a `traceparent` rolls the dice, and none is started.
    let t = tracing(1e-12);
    let mut none = HeaderMap::new();
    none.insert("host", HeaderValue::from_static("backend.shop"));
    let mut unsampled = none.clone();
    unsampled.insert(
        TRACEPARENT,
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
    );
    // Warm up the thread's random number generators (set up once per thread).
    assert!(t.begin(&mut none).is_none());
    let n = allocations(|| {
        for _ in 0..1000 {
            assert!(t.begin(&mut none).is_none());
            assert!(t.begin(&mut unsampled).is_none());
        }
    });
    assert_eq!(n, 0, "allocations for 2000 unsampled requests");

    // The counter sees allocations: a sampled request does allocate (its span's state).
    let mut sampled = none.clone();
    sampled.insert(
        TRACEPARENT,
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let mut held = None;
    let n = allocations(|| held = t.begin(&mut sampled));
    assert!(held.is_some());
    assert!(n > 0, "a sampled request's span allocates");
}
