//! Compiler benchmark on a synthetic cluster (1 000 Services, 10 000 endpoints and pods, 200
//! namespaces, 500 TrafficPolicies). Ignored by `cargo test`; run it in release with
//! `hack/bench-compiler.sh`. It prints a table; it asserts nothing about time (no timed unit
//! tests), only that the work it measures was really done.
//!
//! Baseline, measured in the same run: the naive compile, which builds every namespace's
//! `ProxyConfig` as a value and serializes it with `to_json_pretty()`. The ratios say what the
//! shared per-Service fragments and the incremental path buy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Namespace, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use trellis_operator::api::mesh::LabelSelector;
use trellis_operator::api::peer_authentication::{MtlsMode, MtlsSpec, PeerAuthenticationSpec};
use trellis_operator::api::traffic_policy::{
    RetriesSpec, RetryOn, TargetRef, TimeoutsSpec, TrafficPolicySpec,
};
use trellis_operator::api::{PeerAuthentication, TrafficPolicy};
use trellis_operator::compiler::{Output, SlimPod, Snapshot, compile, digest};
use trellis_operator::controller::compile::strip_pod;
use trellis_proxy::config::ProxyConfig;

const NAMESPACES: usize = 200;
const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const TRAFFIC_POLICIES: usize = 500;

fn meta(ns: &str, name: &str, i: usize) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(format!("00000000-0000-0000-0000-{i:012}")),
        resource_version: Some(format!("{}", 100_000 + i)),
        generation: Some(1),
        creation_timestamp: Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
        )),
        labels: Some(
            [
                ("app".to_string(), name.to_string()),
                ("app.kubernetes.io/part-of".to_string(), "bench".to_string()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

fn tp_spec(target: &str, timeout: &str) -> TrafficPolicySpec {
    TrafficPolicySpec {
        target_ref: TargetRef {
            kind: "Service".into(),
            name: target.into(),
            port: None,
        },
        load_balancer: None,
        timeouts: Some(TimeoutsSpec {
            request: Some(timeout.into()),
            idle: None,
            connect: Some("1s".into()),
        }),
        retries: Some(RetriesSpec {
            attempts: 3,
            per_try_timeout: Some("500ms".into()),
            retry_on: vec![RetryOn::GatewayError, RetryOn::Reset],
            status_codes: vec![],
            grpc_codes: vec![],
            backoff: None,
            budget_percent: None,
            min_retries_per_second: None,
            retry_non_idempotent: false,
        }),
        circuit_breaker: None,
        outlier_detection: None,
        rate_limit: None,
        split: vec![],
    }
}

fn synthetic() -> Snapshot {
    let mut s = Snapshot::default();
    for n in 0..NAMESPACES {
        let mut ns = Namespace {
            metadata: meta("", &format!("ns-{n}"), n),
            ..Default::default()
        };
        ns.metadata.namespace = None;
        ns.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("trellis.dev/inject".into(), "enabled".into());
        s.namespaces.push(Arc::new(ns));
        // One namespace-wide policy per namespace, and a workload policy in every tenth.
        let mut pa = PeerAuthentication::new(
            "default",
            PeerAuthenticationSpec {
                selector: None,
                mtls: MtlsSpec {
                    mode: MtlsMode::Strict,
                },
                port_level_mtls: BTreeMap::new(),
            },
        );
        pa.metadata = meta(&format!("ns-{n}"), "default", n);
        s.peer_authentications.push(Arc::new(pa));
    }
    let mut ip = 0u32;
    for i in 0..SERVICES {
        let ns = format!("ns-{}", i % NAMESPACES);
        let name = format!("svc-{i}");
        let spec = ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            cluster_ips: Some(vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            selector: Some([("app".to_string(), name.clone())].into()),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        };
        s.services.push(Arc::new(Service {
            metadata: meta(&ns, &name, i),
            spec: Some(spec),
            status: None,
        }));
        let mut endpoints = Vec::new();
        for e in 0..ENDPOINTS_PER_SERVICE {
            ip += 1;
            let addr = format!("10.{}.{}.{}", 1 + ip / 65536, (ip / 256) % 256, ip % 256);
            let pod_name = format!("{name}-{e}");
            let mut pod = Pod {
                metadata: meta(&ns, &pod_name, ip as usize),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(addr.clone()),
                    pod_ips: Some(vec![PodIP { ip: addr.clone() }]),
                    phase: Some("Running".into()),
                    ..Default::default()
                }),
            };
            pod.metadata.labels = Some([("app".to_string(), name.clone())].into());
            pod.metadata.annotations =
                Some([("trellis.dev/proxy-version".to_string(), "0.1.0".to_string())].into());
            let mut pod = SlimPod::from(&pod);
            strip_pod(&mut pod);
            s.pods.push(Arc::new(pod));
            endpoints.push(Endpoint {
                addresses: vec![addr],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod_name),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }),
                zone: Some(format!("zone-{}", e % 3)),
                ..Default::default()
            });
        }
        let mut slice_meta = meta(&ns, &format!("{name}-abcde"), i);
        slice_meta.labels = Some([("kubernetes.io/service-name".to_string(), name.clone())].into());
        s.endpoint_slices.push(Arc::new(EndpointSlice {
            metadata: slice_meta,
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        }));
    }
    for t in 0..TRAFFIC_POLICIES {
        let i = t * 2; // every other Service
        let ns = format!("ns-{}", i % NAMESPACES);
        let mut tp = TrafficPolicy::new(&format!("tp-{t}"), tp_spec(&format!("svc-{i}"), "5s"));
        tp.metadata = meta(&ns, &format!("tp-{t}"), t);
        s.traffic_policies.push(Arc::new(tp));
    }
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

    // No change.
    let (noop, same) = time(9, || compile(&snap));
    assert!(same.changed_since(&out).is_empty());

    // One TrafficPolicy changes its timeout.
    let mut changed = snap.clone();
    let mut tp = (*changed.traffic_policies[7]).clone();
    tp.spec = tp_spec(&tp.spec.target_ref.name, "7s");
    changed.traffic_policies[7] = Arc::new(tp);
    let (one_tp, tp_out) = time(9, || compile(&changed));
    let tp_set = tp_out.changed_since(&out);
    let tp_rewrites = tp_set.len();
    let (tp_render, _) = time(3, || render(&tp_out, tp_set.clone()));

    // One namespace-wide PeerAuthentication changes.
    let mut changed_pa = snap.clone();
    let mut pa = (*changed_pa.peer_authentications[3]).clone();
    pa.spec.mtls.mode = MtlsMode::Permissive;
    pa.spec.selector = Some(LabelSelector::default());
    changed_pa.peer_authentications[3] = Arc::new(pa);
    let (one_pa, pa_out) = time(9, || compile(&changed_pa));
    let pa_set = pa_out.changed_since(&out);
    let pa_rewrites = pa_set.len();
    let (pa_render, _) = time(3, || render(&pa_out, pa_set.clone()));

    // One endpoint becomes not ready.
    let mut changed_ep = snap.clone();
    let mut slice = (*changed_ep.endpoint_slices[11]).clone();
    slice.endpoints.as_mut().unwrap()[0]
        .conditions
        .as_mut()
        .unwrap()
        .ready = Some(false);
    changed_ep.endpoint_slices[11] = Arc::new(slice);
    let (one_ep, ep_out) = time(9, || compile(&changed_ep));
    let ep_set = ep_out.changed_since(&out);
    let ep_rewrites = ep_set.len();
    let (ep_render, _) = time(3, || render(&ep_out, ep_set.clone()));

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
        "desired configs: {} namespaces, {:.1} MiB if all rendered, largest {} KiB",
        out.configs.len(),
        bytes as f64 / 1048576.0,
        largest / 1024
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
        "| render + SHA-256 of all {} configs (applier, first sync) | {} | {} |",
        all.len(),
        ms(render_all),
        ratio(render_all)
    );
    println!(
        "| recompile, nothing changed: {} namespaces to rewrite | {} | {} |",
        same.changed_since(&out).len(),
        ms(noop),
        ratio(noop)
    );
    println!(
        "| recompile, one TrafficPolicy changed: {} namespaces to rewrite (render {}) | {} | {} |",
        tp_rewrites,
        ms(tp_render),
        ms(one_tp),
        ratio(one_tp)
    );
    println!(
        "| recompile, one namespace PeerAuthentication changed: {} to rewrite (render {}) | {} | {} |",
        pa_rewrites,
        ms(pa_render),
        ms(one_pa),
        ratio(one_pa)
    );
    println!(
        "| recompile, one endpoint not ready: {} to rewrite (render {}) | {} | {} |",
        ep_rewrites,
        ms(ep_render),
        ms(one_ep),
        ratio(one_ep)
    );
    println!("| RSS: process before the snapshot | {} | |", mib(rss0));
    println!(
        "| RSS: holding the snapshot (pods as SlimPod, as the controller caches them) | {} | |",
        mib(rss_snap)
    );
    println!("| RSS: snapshot + compiled output | {} | |", mib(rss_out));
    println!(
        "| RSS peak before the baseline (compile, render all one by one) | {} | |",
        mib(hwm)
    );
    assert_eq!(pa_rewrites, 1);
    assert_eq!(ep_rewrites, 1);
}
