//! Compiler benchmark on a synthetic cluster (1 000 Services, 10 000 endpoints and pods, 200
//! namespaces, 500 TrafficPolicies). Ignored by `cargo test`; run it in release with
//! `hack/bench-compiler.sh`. It prints a table; it asserts nothing about time (no timed unit
//! tests), only that the work it measures was really done.
//!
//! Baseline, measured in the same run: the naive compile, which builds every namespace's
//! `ProxyConfig` as a value and serializes it with `to_json_pretty()`. The ratios say what the
//! shared per-Service fragments and the incremental path buy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_operator::api::mesh::LabelSelector;
use trellis_operator::api::peer_authentication::MtlsMode;
use trellis_operator::compiler::visibility::IMPORT_FROM_ANNOTATION;
use trellis_operator::compiler::{Output, Snapshot, compile, compile_incremental, digest};
use trellis_proxy::config::ProxyConfig;

mod synthetic;

use synthetic::{BENCH, tp_spec};

const NAMESPACES: usize = BENCH.namespaces;

/// The benchmark's cluster with `configMap: Full`: it measures the full table in every
/// namespace (`Auto`, the default, would carry bootstrap sets at this size).
fn synthetic() -> Snapshot {
    let mut s = synthetic::synthetic(BENCH);
    let mut mesh = trellis_operator::api::Mesh::new(
        trellis_operator::api::MESH_NAME,
        trellis_operator::api::MeshSpec::default(),
    );
    mesh.spec.discovery.config_map = trellis_operator::api::mesh::ConfigMapContent::Full;
    s.mesh = Some(Arc::new(mesh));
    s
}

/// The baseline: every namespace's config as a value (parsed once, untimed), serialized with
/// `to_json_pretty()`: the least a compiler that builds values per namespace must do.
fn values(out: &Output) -> Vec<ProxyConfig> {
    out.configs
        .values()
        .map(|c| serde_json::from_str(&c.render()).unwrap())
        .collect()
}

/// Renders (and hashes, as the applier does) the given namespaces one at a time.
fn render(out: &Output, namespaces: impl IntoIterator<Item = String>) -> usize {
    let mut bytes = 0;
    for ns in namespaces {
        let text = out.configs[&ns].render();
        bytes += text.len() + digest(&text).len();
    }
    bytes
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = f();
        times.push(t.elapsed());
        last = Some(r);
    }
    (median(times), last.unwrap())
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[test]
#[ignore = "benchmark: run hack/bench-compiler.sh (release)"]
fn bench_compiler() {
    let (rss0, _) = rss_kib();
    let snap = synthetic();
    let (rss_snap, _) = rss_kib();
    let endpoints: usize = snap
        .endpoint_slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .sum();

    let (full, out) = time(9, || compile(&snap));
    assert_eq!(out.configs.len(), NAMESPACES, "{:?}", out.mesh);
    assert!(out.too_large.is_empty() && out.invalid.is_empty());
    let (rss_out, _) = rss_kib();
    let all: Vec<String> = out.configs.keys().cloned().collect();
    let bytes: usize = out.configs.values().map(|c| c.len()).sum();
    let largest = out.configs.values().map(|c| c.len()).max().unwrap();

    // The applier's first sync renders every namespace, one at a time.
    let (render_all, _) = time(3, || render(&out, all.clone()));
    let (_, hwm) = rss_kib();

    // Baseline: serialize every namespace's config from a value.
    let vals = values(&out);
    let (naive_t, naive_bytes) = time(3, || {
        vals.iter().map(|v| v.to_json_pretty().len()).sum::<usize>()
    });
    assert_eq!(
        naive_bytes, bytes,
        "the spliced text is the contract's serialization"
    );
    drop(vals);

    // What the controller does on a change: an incremental recompile against the previous
    // output, then render and write the namespaces whose revision moved. Each is compared with a
    // full compile of the same snapshot (same revisions, asserted) to show what reuse buys.
    let tp_change = |snap: &Snapshot, t: usize| {
        let mut changed = snap.clone();
        let mut tp = (*changed.traffic_policies[t]).clone();
        tp.spec = tp_spec(&tp.spec.target_ref.name, "7s");
        changed.traffic_policies[t] = Arc::new(tp);
        changed
    };
    let mut changed_pa = snap.clone();
    let mut pa = (*changed_pa.peer_authentications[3]).clone();
    pa.spec.mtls.mode = MtlsMode::Permissive;
    pa.spec.selector = Some(LabelSelector::default());
    changed_pa.peer_authentications[3] = Arc::new(pa);
    let mut changed_ep = snap.clone();
    let mut slice = (*changed_ep.endpoint_slices[11]).clone();
    slice.endpoints.as_mut().unwrap()[0]
        .conditions
        .as_mut()
        .unwrap()
        .ready = Some(false);
    changed_ep.endpoint_slices[11] = Arc::new(slice);

    // The same cluster where every namespace imports only its own Services and those of two
    // platform namespaces (`trellis.dev/import-from: ns-0,ns-1`), the usual shape of a
    // multi-tenant cluster.
    let mut scoped = snap.clone();
    for ns in &mut scoped.namespaces {
        let mut n = (**ns).clone();
        n.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(IMPORT_FROM_ANNOTATION.into(), "ns-0,ns-1".into());
        *ns = Arc::new(n);
    }
    let (scoped_full, scoped_out) = time(9, || compile(&scoped));
    assert_eq!(scoped_out.configs.len(), NAMESPACES);
    let scoped_largest = scoped_out.configs.values().map(|c| c.len()).max().unwrap();
    let scoped_bytes: usize = scoped_out.configs.values().map(|c| c.len()).sum();

    struct Row {
        what: &'static str,
        rewrites: usize,
        indexed: usize,
        serialized: usize,
        incremental: Duration,
        full: Duration,
        render: Duration,
    }
    let measure = |what: &'static str, base: &Output, next: &Snapshot| {
        let (inc, inc_out) = time(9, || compile_incremental(next, Some(base)));
        let (full, full_out) = time(5, || compile(next));
        let revisions = |o: &Output| {
            o.configs
                .iter()
                .map(|(ns, c)| (ns.clone(), c.revision().to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(revisions(&inc_out), revisions(&full_out), "{what}");
        let set = inc_out.changed_since(base);
        let (render_t, _) = time(3, || render(&inc_out, set.clone()));
        Row {
            what,
            rewrites: set.len(),
            indexed: inc_out.stats.namespaces_indexed,
            serialized: inc_out.stats.serialized,
            incremental: inc,
            full,
            render: render_t,
        }
    };
    let rows = [
        measure("nothing changed", &out, &snap),
        measure("one TrafficPolicy changed", &out, &tp_change(&snap, 7)),
        measure(
            "one namespace PeerAuthentication changed",
            &out,
            &changed_pa,
        ),
        measure("one endpoint not ready", &out, &changed_ep),
        measure(
            "scoped: one TrafficPolicy on a tenant Service (ns-14)",
            &scoped_out,
            &tp_change(&scoped, 7),
        ),
        measure(
            "scoped: one TrafficPolicy on a platform Service (ns-0)",
            &scoped_out,
            &tp_change(&scoped, 0),
        ),
    ];

    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let ratio = |d: Duration| format!("{:.2}", d.as_secs_f64() / naive_t.as_secs_f64());
    println!();
    println!(
        "synthetic cluster: {} namespaces (all meshed), {} Services, {} endpoints, {} pods, {} TrafficPolicies, {} PeerAuthentications",
        snap.namespaces.len(),
        snap.services.len(),
        endpoints,
        snap.pods.len(),
        snap.traffic_policies.len(),
        snap.peer_authentications.len()
    );
    println!(
        "desired configs: {} namespaces, {:.1} MiB if all rendered, largest {} KiB; scoped: {:.1} MiB, largest {} KiB",
        out.configs.len(),
        bytes as f64 / 1048576.0,
        largest / 1024,
        scoped_bytes as f64 / 1048576.0,
        scoped_largest / 1024
    );
    println!();
    println!("| measurement (median) | time | vs baseline |");
    println!("|---|---|---|");
    println!(
        "| baseline: to_json_pretty of all {} configs from values | {} | 1.00 |",
        all.len(),
        ms(naive_t)
    );
    println!(
        "| full compile (indexes, fragments, revisions, validation; no text) | {} | {} |",
        ms(full),
        ratio(full)
    );
    println!(
        "| full compile, scoped visibility | {} | {} |",
        ms(scoped_full),
        ratio(scoped_full)
    );
    println!(
        "| render + SHA-256 of all {} configs (applier, first sync) | {} | {} |",
        all.len(),
        ms(render_all),
        ratio(render_all)
    );
    println!();
    println!(
        "| change | namespaces rewritten | namespaces re-indexed | Services re-serialized | incremental recompile | full recompile | incremental / full | render + hash of the rewritten |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            r.what,
            r.rewrites,
            r.indexed,
            r.serialized,
            ms(r.incremental),
            ms(r.full),
            r.incremental.as_secs_f64() / r.full.as_secs_f64(),
            ms(r.render)
        );
    }
    println!();
    println!("| memory | RSS |");
    println!("|---|---|");
    println!("| process before the snapshot | {} |", mib(rss0));
    println!(
        "| holding the snapshot (pods as the pod cache's records) | {} |",
        mib(rss_snap)
    );
    println!("| snapshot + compiled output | {} |", mib(rss_out));
    println!(
        "| peak before the baseline (compile, render all one by one) | {} |",
        mib(hwm)
    );
    // The work measured is the work claimed.
    assert_eq!(
        (rows[0].rewrites, rows[0].indexed, rows[0].serialized),
        (0, 0, 0)
    );
    assert_eq!(rows[1].indexed, 0);
    assert_eq!(rows[3].indexed, 1);
    assert_eq!((rows[1].rewrites, rows[1].serialized), (NAMESPACES, 1));
    assert_eq!(rows[2].rewrites, 1);
    assert_eq!(rows[3].rewrites, 1);
    assert_eq!((rows[4].rewrites, rows[4].serialized), (1, 1));
    assert_eq!(rows[5].rewrites, NAMESPACES);
}
