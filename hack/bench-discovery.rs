//! Discovery at cluster scale, in one process: a synthetic cluster (namespaces x Services x
//! endpoints), the real compiler, the real discovery view and registry, and simulated streams
//! (registry entries, no sockets), each subscribed to some Services. Reports compile time,
//! the largest ConfigMap (in Full and in Bootstrap mode), operator RSS, and the time from an
//! EndpointSlice change until every stream it concerns has its messages and has acknowledged
//! the new generation (the replica's table-only compile, the view's incremental update and the
//! publish to subscribers, each woken stream's take and ack), p50/p99.
//!
//! Not measured here: the network and TLS of 1 000 real streams, the proxies' apply, and the
//! fixed waits the design adds on top (the replica gathers watch events for
//! `discovery::replica::COMPILE_DEBOUNCE`, 100 ms, and each stream for `discovery::DEBOUNCE`,
//! 50 ms); the real-socket path is covered by `operator/tests/discovery.rs`.
//!
//! `cargo run --release -p trellis-operator --example bench-discovery -- [namespaces]
//! [services per namespace] [endpoints per service] [streams] [subscriptions] [changes]
//! [pods: 1 = a meshed pod behind every endpoint]`
//!
//! With pods, each pod is the JSON the API server sends on a watch, read as the watch reads it
//! and fed as watcher events (`Init`, `InitApply`, `InitDone`) to the operator's own pod cache
//! (`trellis_operator::pods::store`), so the benchmark holds exactly what the operator holds.
//! The last line (`RESULT ...`) is for `hack/bench-discovery.sh`, which takes medians.

#[path = "../operator/tests/compiler_fixtures/mod.rs"]
mod fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixtures::*;
use kube::runtime::watcher;
use trellis_operator::compiler;
use trellis_operator::discovery::{Registry, View};
use trellis_proxy::discovery::{ServerMessage, Target};

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:` now, `VmHWM:` peak).
fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn endpoint_ip(ns: usize, svc: usize, e: usize, salt: usize) -> String {
    let n = ns * 10_000 + svc * 100 + e + salt;
    format!("10.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
}

/// One Service's EndpointSlice; with `pods`, each endpoint names its pod (which gives it the
/// pod's identity).
fn slice_for(ns: usize, svc: usize, endpoints: usize, salt: usize, pods: bool) -> Slice {
    let mut s = slice(&format!("ns{ns}"), &format!("s{svc}"), &format!("s{svc}-x"))
        .port(Some("http"), 8080);
    for e in 0..endpoints {
        let pod = pod_name(svc, e);
        s = s.endpoint(&endpoint_ip(ns, svc, e, salt), pods.then_some(pod.as_str()));
    }
    s
}

/// The pod behind endpoint `e` of Service `svc`: a Deployment's pod name.
fn pod_name(svc: usize, e: usize) -> String {
    format!("s{svc}-7d9f8c6b5-{e:05}")
}

/// A meshed pod as the API server sends it on a watch: what the operator reads (name,
/// namespace, labels, service account, IPs, the injector's annotation) and what a real pod
/// carries besides (owner, uid, resource version, managed fields, other annotations,
/// containers, conditions), so the cache measured is the one the operator keeps.
fn pod_json(ns: usize, svc: usize, e: usize) -> String {
    let ip = endpoint_ip(ns, svc, e, 0);
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(svc, e), "generateName": format!("s{svc}-7d9f8c6b5-"),
            "namespace": format!("ns{ns}"),
            "uid": format!("6f1c2a3b-0000-4000-8000-{:012}", ns * 100_000 + svc * 100 + e),
            "resourceVersion": format!("{}", 1_000_000 + e), "creationTimestamp": "2026-11-29T10:00:00Z",
            "labels": {"app": format!("s{svc}"), "pod-template-hash": "7d9f8c6b5"},
            "annotations": {
                "trellis.dev/proxy-version": "ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
                "kubectl.kubernetes.io/restartedAt": "2026-11-29T10:00:00Z",
                "prometheus.io/scrape": "true"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("s{svc}-7d9f8c6b5"), "uid": format!("rs-{ns}-{svc}"), "controller": true,
                "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "time": "2026-11-29T10:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}]
        },
        "spec": {
            "serviceAccountName": format!("s{svc}"), "serviceAccount": format!("s{svc}"),
            "containers": [{"name": "app", "image": "registry.example/app:1.2.3"},
                           {"name": "trellis-proxy", "image": "ghcr.io/trellis-mesh/trellis-proxy:0.1.0"}],
            "nodeName": "node-1"
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
    .to_string()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (namespaces, per_ns, endpoints, streams, subs, changes) = (
        arg(0, 1000),
        arg(1, 10),
        arg(2, 10),
        arg(3, 1000),
        arg(4, 20),
        arg(5, 50),
    );
    // 1: a meshed pod behind every endpoint (the cluster's pods in the caches and the
    // compile, identities on every endpoint); 0 (default): no pods, as earlier runs.
    let pods = arg(6, 0) == 1;
    let base = rss_mib();
    let mut w = World::new();
    let (pod_store, mut pod_writer) = trellis_operator::pods::store();
    pod_writer.apply_watcher_event(&watcher::Event::Init);
    for ns in 0..namespaces {
        w.add(namespace(&format!("ns{ns}")).meshed());
        for svc in 0..per_ns {
            let n = ns * per_ns + svc;
            w.add(
                service(&format!("ns{ns}"), &format!("s{svc}"))
                    .ip(&format!(
                        "10.{}.{}.{}",
                        96 + (n >> 16),
                        (n >> 8) & 255,
                        n & 255
                    ))
                    .port(80, "http"),
            );
            w.add(slice_for(ns, svc, endpoints, 0, pods));
        }
    }
    // Where the memory goes, roughly (RSS growth per stage): the other objects, the pods.
    let rss_objects = rss_mib();
    for ns in (0..namespaces).filter(|_| pods) {
        for svc in 0..per_ns {
            for e in 0..endpoints {
                let json = pod_json(ns, svc, e);
                let pod: compiler::SlimPod =
                    serde_json::from_str(&json).expect("the pod JSON reads as a SlimPod");
                pod_writer.apply_watcher_event(&watcher::Event::InitApply(pod));
            }
        }
    }
    pod_writer.apply_watcher_event(&watcher::Event::InitDone);
    let rss_pods = rss_mib();
    // The pods as the operator holds them: its pod cache, each pod read from the API server's
    // JSON and kept as a record indexed by namespace. Later snapshots are taken the same way.
    w.snap.pods = pod_store.state();
    // `configMap: Full` explicitly: the numbers below measure (and stay comparable with
    // earlier runs of) the full table in every namespace; `Auto`, the default, would carry
    // bootstrap sets at this size, as the Bootstrap compile below does.
    w.snap.mesh = Some(Arc::new(trellis_operator::api::Mesh::new(
        "default",
        trellis_operator::api::MeshSpec {
            discovery: trellis_operator::api::mesh::DiscoverySpec {
                config_map: trellis_operator::api::mesh::ConfigMapContent::Full,
            },
            ..Default::default()
        },
    )));
    let t = Instant::now();
    let mut out = compiler::compile(&w.snap);
    let compile_full = t.elapsed();
    let rss_compiled = rss_mib();
    let max_cm = out.configs.values().map(|c| c.len()).max().unwrap_or(0);
    let too_large = out.too_large.len();
    let largest_refused = out.too_large.values().map(|t| t.bytes).max().unwrap_or(0);

    let mut reg = Registry::default();
    let mut generation = 1;
    reg.update(&out, generation);
    let mut ids = Vec::with_capacity(streams);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize
    };
    for s in 0..streams {
        let id = reg.open(&format!("ns{}", s % namespaces));
        let targets = (0..subs)
            .map(|_| Target::Service(format!("s{}.ns{}", next() % per_ns, next() % namespaces)))
            .collect();
        reg.subscribe(id, targets);
        reg.take(id);
        reg.ack(id, generation);
        ids.push(id);
    }
    let rss_loaded = rss_mib();

    let mut lat = Vec::with_capacity(changes);
    let mut phases = Vec::with_capacity(changes);
    let (mut pushed, mut woken) = (0usize, 0usize);
    for c in 0..changes {
        let (ns, svc) = (next() % namespaces, next() % per_ns);
        // The EndpointSlice changes (a rollout replaced a pod): a new object, as a watch
        // delivers it.
        let idx = ns * per_ns + svc;
        let name = format!("s{svc}-x");
        let pos = w
            .snap
            .endpoint_slices
            .iter()
            .position(|s| {
                s.metadata.namespace.as_deref() == Some(&format!("ns{ns}"))
                    && s.metadata.name.as_deref() == Some(&name)
            })
            .unwrap_or(idx);
        let mut tmp = compiler::Snapshot::default();
        slice_for(ns, svc, endpoints, 1 + c, pods).add_to(&mut tmp);
        w.snap.endpoint_slices[pos] = tmp.endpoint_slices.pop().unwrap();
        let t = Instant::now();
        // What a replica's discovery loop runs: the table only, no namespace configs.
        out = compiler::compile_discovery(&w.snap, Some(&out));
        let compiled = t.elapsed();
        generation += 1;
        // What `Hub::publish` runs: the view follows the compile, the subscribers are woken.
        let wake = reg.update(&out, generation);
        let published = t.elapsed();
        woken += wake.len();
        // Each woken stream sends its messages, and its proxy applies them and acknowledges.
        for id in wake {
            let msgs = reg.take(id);
            pushed += msgs
                .iter()
                .filter(|m| matches!(m, ServerMessage::Service { .. }))
                .count();
            if let Some(ServerMessage::Synced { generation }) = msgs.last() {
                reg.ack(id, *generation);
            }
        }
        lat.push(t.elapsed());
        let p = reg.propagation();
        assert_eq!(
            (p.generation, p.updated, p.total),
            (generation, streams, streams),
            "every stream holds the new view"
        );
        phases.push((compiled, published - compiled, t.elapsed() - published));
    }
    // The same cluster with `spec.discovery.configMap: Bootstrap`: each namespace's ConfigMap
    // is its bootstrap set, the rest is what the streams serve. Compiled after the RSS reading
    // so the Full-mode numbers above stay comparable with earlier runs.
    let mut boot_snap = w.snap.clone();
    boot_snap.mesh = Some(Arc::new(trellis_operator::api::Mesh::new(
        "default",
        trellis_operator::api::MeshSpec {
            discovery: trellis_operator::api::mesh::DiscoverySpec {
                config_map: trellis_operator::api::mesh::ConfigMapContent::Bootstrap,
            },
            ..Default::default()
        },
    )));
    let t = Instant::now();
    let boot = compiler::compile(&boot_snap);
    let compile_boot = t.elapsed();
    let boot_max = boot.configs.values().map(|c| c.len()).max().unwrap_or(0);
    let boot_total: usize = boot.configs.values().map(|c| c.len()).sum();
    let boot_written = boot.configs.len();
    let boot_refused = boot.too_large.len();
    let peak = status_mib("VmHWM:");
    // For comparison, after the memory readings: the same kind of change through the
    // from-scratch path (a view indexed anew, every subscription of every stream compared,
    // every stream woken), which is what every change cost before the view followed compiles.
    let mut scratch = Vec::new();
    for c in 0..5 {
        let (ns, svc) = (next() % namespaces, next() % per_ns);
        let name = format!("s{svc}-x");
        let pos = w
            .snap
            .endpoint_slices
            .iter()
            .position(|s| {
                s.metadata.namespace.as_deref() == Some(&format!("ns{ns}"))
                    && s.metadata.name.as_deref() == Some(&name)
            })
            .unwrap_or(ns * per_ns + svc);
        let mut tmp = compiler::Snapshot::default();
        slice_for(ns, svc, endpoints, 1000 + c, pods).add_to(&mut tmp);
        w.snap.endpoint_slices[pos] = tmp.endpoint_slices.pop().unwrap();
        out = compiler::compile_discovery(&w.snap, Some(&out));
        generation += 1;
        let t = Instant::now();
        let view = Arc::new(View::new(&out, generation).unwrap());
        let indexed = t.elapsed();
        for id in reg.publish(view) {
            if let Some(ServerMessage::Synced { generation }) = reg.take(id).last() {
                reg.ack(id, *generation);
            }
        }
        scratch.push((indexed, t.elapsed() - indexed));
    }
    let scratch_n = scratch.len() as u32;
    let scratch_index = scratch.iter().map(|s| s.0).sum::<Duration>() / scratch_n;
    let scratch_publish = scratch.iter().map(|s| s.1).sum::<Duration>() / scratch_n;
    let n = phases.len().max(1) as u32;
    let mean = |f: fn(&(Duration, Duration, Duration)) -> Duration| {
        phases.iter().map(f).sum::<Duration>() / n
    };
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "cluster: {namespaces} namespaces, {} Services, {} endpoints, {} pods; {streams} streams x {subs} subscriptions",
        namespaces * per_ns,
        namespaces * per_ns * endpoints,
        if pods {
            namespaces * per_ns * endpoints
        } else {
            0
        }
    );
    println!("full compile: {:.0} ms", ms(compile_full));
    println!(
        "largest ConfigMap written: {} KiB; {} namespaces over the 1 MiB limit (largest {} KiB, not written)",
        max_cm / 1024,
        too_large,
        largest_refused / 1024
    );
    println!(
        "Bootstrap mode (spec.discovery.configMap: Bootstrap): compile {:.0} ms; largest ConfigMap {:.1} KiB, {:.1} MiB in all; {} written, {} over the limit",
        ms(compile_boot),
        boot_max as f64 / 1024.0,
        boot_total as f64 / (1024.0 * 1024.0),
        boot_written,
        boot_refused
    );
    println!(
        "RSS: {:.0} MiB before the cluster, {:.0} MiB with cluster, compile and streams; peak {:.0} MiB (the Bootstrap compile included)",
        base, rss_loaded, peak
    );
    println!(
        "RSS growth by stage: Services, slices and namespaces {:.0} MiB; pod cache {:.0} MiB ({:.0} bytes a pod); full compile's output {:.0} MiB; registry and streams {:.0} MiB",
        rss_objects - base,
        rss_pods - rss_objects,
        (rss_pods - rss_objects) * 1024.0 * 1024.0
            / (namespaces * per_ns * endpoints).max(1) as f64,
        rss_compiled - rss_pods,
        rss_loaded - rss_compiled
    );
    println!(
        "endpoint change -> every concerned stream's messages taken and acked (table compile + view update + publish + take + ack), {changes} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {woken} streams woken, {pushed} Service pushes",
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*lat.last().unwrap())
    );
    println!(
        "mean per change: compile {:.1} ms, view update + publish {:.1} ms, take + ack {:.2} ms",
        ms(mean(|p| p.0)),
        ms(mean(|p| p.1)),
        ms(mean(|p| p.2)),
    );
    println!(
        "from scratch, for comparison (5 changes): view index {:.1} ms, publish to every stream + take + ack {:.1} ms",
        ms(scratch_index),
        ms(scratch_publish)
    );
    println!(
        "RESULT rss_mib={:.0} peak_mib={:.0} objects_mib={:.0} pods_mib={:.0} compiled_mib={:.0} boot_max_kib={:.1} p50_ms={:.1} p99_ms={:.1} compile_ms={:.1} publish_ms={:.2} scratch_index_ms={:.1} scratch_publish_ms={:.1}",
        rss_loaded,
        peak,
        rss_objects - base,
        rss_pods - rss_objects,
        rss_compiled - rss_pods,
        boot_max as f64 / 1024.0,
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(mean(|p| p.0)),
        ms(mean(|p| p.1)),
        ms(scratch_index),
        ms(scratch_publish),
    );
}
