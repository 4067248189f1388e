//! Discovery under failure, with real parts only: real `trellis-proxy` sidecars (in-process, on
//! real sockets, mTLS between them), the operator's real discovery server, and a Mesh in
//! `Bootstrap` mode, so the caller's ConfigMap (compiled by the real compiler) does not list the
//! destination and everything it knows about it came over the stream.
//!
//! Each operator replica runs on its own runtime thread: killing it drops the runtime, which
//! closes its listener and every stream at once (what the process exiting does), and freezing
//! it stops the thread while its sockets stay open (a hung process or a lost node: no FIN).

#[path = "../../sidecar/tests/common/mod.rs"]
mod common;
mod compiler_fixtures;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compiler_fixtures::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use trellis_operator::api::mesh::ConfigMapContent;
use trellis_operator::api::traffic_policy::SplitBackend;
use trellis_operator::compiler::{self, Output};
use trellis_operator::discovery::{Hub, serve};
use trellis_proxy::config::{MtlsMode, ProxyConfig};
use trellis_proxy::creds::Credentials;

const OPERATOR_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-operator";
/// The identity of every pod of the `api` namespace in these tests.
const API_ID: &str = "spiffe://cluster.local/ns/api/sa/web";
const CALLER_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

// ---- The cluster as the compiler sees it ----

/// `shop` (the caller's namespace: meshed, no Services of its own) and `api` (meshed) with one
/// Service per `(name, endpoint)`, whose one endpoint is a sidecar's inbound listener. The
/// Mesh is in `Bootstrap` mode: shop's ConfigMap lists nothing of `api`.
fn cluster(backends: &[(&str, SocketAddr)]) -> World {
    let mut w = World::new()
        .with(namespace("shop").meshed())
        .with(namespace("api").meshed())
        .with(namespace("trellis-system"))
        .with(mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Bootstrap));
    for (i, (name, ep)) in backends.iter().enumerate() {
        let ip = ep.ip().to_string();
        let pod_name = format!("{name}-0");
        w.add(
            service("api", name)
                .ip(&format!("10.96.1.{}", 10 + i))
                .port(80, "http"),
        );
        w.add(
            slice("api", name, &format!("{name}-1"))
                .port(Some("http"), i32::from(ep.port()))
                .endpoint(&ip, Some(&pod_name)),
        );
        w.add(pod("api", &pod_name).sa("web").ip(&ip).sidecar());
    }
    w
}

fn compile(w: &World, previous: Option<&Output>) -> Output {
    compiler::compile_incremental(&w.snap, previous)
}

/// The caller's ConfigMap as the operator renders it; it must not list `api`'s Services, or
/// the tests would not be testing the stream.
fn caller_config(out: &Output) -> ProxyConfig {
    let cfg = ProxyConfig::from_json(out.config("shop").expect("shop's config").as_bytes())
        .expect("the sidecar parses it");
    assert!(
        cfg.outbound.iter().all(|s| s.namespace != "api"),
        "bootstrap ConfigMap lists api: {:?}",
        cfg.outbound
    );
    cfg
}

// ---- Operator replicas on their own runtimes ----

fn creds(pki: &common::Pki, id: &str) -> Credentials {
    let (c, k) = pki.leaf(id);
    trellis_proxy::tls::credentials_from_pem(
        &std::fs::read(c).unwrap(),
        &std::fs::read(k).unwrap(),
        pki.ca_pem.as_bytes(),
    )
    .unwrap()
}

enum Stop {
    /// Drop the runtime: listener and streams closed, as when the process exits.
    Kill,
    /// Stop running, sockets left open, until the sender of this channel is dropped.
    Freeze(std::sync::mpsc::Receiver<()>),
}

/// One operator replica: the real discovery server on a current-thread runtime of its own.
struct Replica {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
    thaw: Option<std::sync::mpsc::Sender<()>>,
}

impl Replica {
    /// Starts a replica on `addr` (`127.0.0.1:0` for any port; a former replica's address to
    /// restart it there) serving `out`.
    fn start(pki: &common::Pki, addr: SocketAddr, out: &Output) -> Self {
        let std_listener = std::net::TcpListener::bind(addr).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let tls = trellis_proxy::tls::server_config(&creds(pki, OPERATOR_ID), &[b"h2"]).unwrap();
        let hub = Hub::new();
        hub.publish(out);
        let (stop_tx, stop_rx) = oneshot::channel();
        let served = hub.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let stop = rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                // The last value stays readable after the sender is gone.
                let tls = tokio::sync::watch::channel(Some(tls)).1;
                tokio::spawn(serve(listener, tls, served, CancellationToken::new()));
                stop_rx.await.unwrap_or(Stop::Kill)
            });
            if let Stop::Freeze(thaw) = stop {
                let _ = thaw.recv();
            }
            drop(rt);
        });
        Replica {
            addr,
            hub,
            stop: Some(stop_tx),
            thread: Some(thread),
            thaw: None,
        }
    }

    async fn kill(mut self) {
        let _ = self.stop.take().unwrap().send(Stop::Kill);
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    fn freeze(&mut self) {
        let (thaw_tx, thaw_rx) = std::sync::mpsc::channel();
        let _ = self.stop.take().unwrap().send(Stop::Freeze(thaw_rx));
        self.thaw = Some(thaw_tx);
    }

    /// Proxies holding a stream to this replica.
    fn streams(&self) -> usize {
        self.hub.propagation().total
    }

    /// Whether every stream of this replica acknowledged its latest view.
    fn all_acked(&self) -> bool {
        let p = self.hub.propagation();
        p.total > 0 && p.updated == p.total
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Kill);
        }
        self.thaw.take();
        // Not joined: a drop may run inside the test's runtime, which must not block.
    }
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- Sidecars and load ----

/// An HTTP app on 127.0.0.1:0 answering every request with `body`.
async fn app(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A pod of `api`: its sidecar accepts mTLS only (so a 200 through it proves mTLS) and
/// forwards to an app answering `body`.
async fn api_pod(pki: &common::Pki, body: &'static str) -> common::TestProxy {
    common::TestProxy::start(
        pki,
        API_ID,
        &common::config("api-1", common::inbound(MtlsMode::Strict), vec![]),
        Some(app(body).await),
    )
    .await
}

/// The caller's sidecar, with its ConfigMap from the compiler and the stream to `operators`.
async fn caller(
    pki: &common::Pki,
    cfg: &ProxyConfig,
    operators: Vec<SocketAddr>,
) -> common::TestProxy {
    common::TestProxy::start_with(pki, CALLER_ID, cfg, None, |o| {
        o.discovery = Some(trellis_proxy::discovery::resolver::Settings {
            addrs: operators.iter().map(ToString::to_string).collect(),
            operator_id: OPERATOR_ID.into(),
        })
    })
    .await
}

/// The body of a 200 to `GET http://<authority>/` through `proxy`, else what went wrong.
async fn get(proxy: SocketAddr, authority: &str) -> Result<String, String> {
    let (status, _, body) = common::h1_send(proxy, common::get(authority, "/")).await?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if status == http::StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// When each request finished and how.
type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

/// Steady load: `workers` clients, each sending one request on a fresh connection (so every
/// request goes through the proxy's lookup and, when needed, resolution) every `every`.
struct Load {
    stop: CancellationToken,
    log: Log,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: SocketAddr, authority: &'static str, workers: usize, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let log: Log = Arc::default();
        let tasks = (0..workers)
            .map(|_| {
                let (stop, log) = (stop.clone(), log.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.is_cancelled() {
                        tick.tick().await;
                        let r = get(proxy, authority).await;
                        log.lock().unwrap().push((Instant::now(), r));
                    }
                })
            })
            .collect();
        Load { stop, log, tasks }
    }

    /// Whether a request that finished after `since` was answered `body`.
    fn seen_since(&self, since: Instant, body: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|(t, r)| *t > since && r.as_deref() == Ok(body))
    }

    fn len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Stops; returns (answers by body, failures).
    async fn finish(self) -> (BTreeMap<String, usize>, Vec<String>) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        let mut bodies = BTreeMap::new();
        let mut failures = Vec::new();
        for (_, r) in log {
            match r {
                Ok(b) => *bodies.entry(b).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
        (bodies, failures)
    }
}

/// About 300 requests/s: 12 clients, one request each every 40 ms.
const WORKERS: usize = 12;
const EVERY: Duration = Duration::from_millis(40);

/// How one test ends an operator replica's service.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Killed, then started again on the same address.
    KillAndRestart,
    /// Killed; another replica at another address is up.
    KillOneOfTwo,
    /// Hung (no FIN, no answer); another replica at another address is up.
    FreezeOneOfTwo,
}

/// The operator fails under load; requests keep succeeding from the proxy's cache, the
/// stream comes back (to the same address or to the other replica), and an endpoint change
/// made after that reaches the proxy and carries the next requests.
async fn operator_failure_under_load(failure: Failure) {
    let pki = common::Pki::new("mesh");
    let (b, c) = (api_pod(&pki, "b").await, api_pod(&pki, "c").await);
    let out1 = compile(&cluster(&[("web", b.running.inbound_addr)]), None);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let first = Replica::start(&pki, any, &out1);
    let second = match failure {
        Failure::KillAndRestart => None,
        Failure::KillOneOfTwo | Failure::FreezeOneOfTwo => Some(Replica::start(&pki, any, &out1)),
    };
    let mut operators = vec![first.addr];
    operators.extend(second.as_ref().map(|r| r.addr));
    let client = caller(&pki, &caller_config(&out1), operators).await;
    let proxy = client.running.outbound_addr;

    // Load from the start: the very first requests resolve `web.api` on the stream.
    let started = Instant::now();
    let load = Load::start(proxy, "web.api", WORKERS, EVERY);
    let connected = |r: &Replica| r.streams() == 1;
    eventually("the proxy holds a stream", Duration::from_secs(5), || {
        connected(&first) || second.as_ref().is_some_and(connected)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The replica the proxy is connected to fails.
    let (failed, survivor) = match second {
        Some(second) if connected(&second) => (second, Some(first)),
        Some(second) => (first, Some(second)),
        None => (first, None),
    };
    let failed_addr = failed.addr;
    let before = load.len();
    let mut frozen = None;
    match failure {
        Failure::FreezeOneOfTwo => {
            let mut failed = failed;
            failed.freeze();
            frozen = Some(failed);
        }
        _ => failed.kill().await,
    }
    // Without an operator (or with a hung one), the proxy serves from its cache.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        load.len() > before + 100,
        "load kept flowing while the operator was down: {} requests",
        load.len() - before
    );

    let serving = match survivor {
        Some(r) => r,
        None => Replica::start(&pki, failed_addr, &out1),
    };
    // The proxy finds the serving replica and acknowledges its view.
    let reconnect = match failure {
        // A hung replica is noticed by the HTTP/2 keepalive, not by a closed socket.
        Failure::FreezeOneOfTwo => Duration::from_secs(20),
        _ => Duration::from_secs(10),
    };
    let t = Instant::now();
    eventually("the stream resumes", reconnect, || serving.all_acked()).await;
    eprintln!(
        "{failure:?}: stream acknowledged {:?} after a replica serves again",
        t.elapsed()
    );

    // The endpoint moves to the other pod: the next requests follow, well within a second.
    let out2 = compile(&cluster(&[("web", c.running.inbound_addr)]), Some(&out1));
    let moved = Instant::now();
    serving.hub.publish(&out2);
    eventually(
        "the endpoint change reaches the proxy",
        Duration::from_secs(1),
        || load.seen_since(moved, "c"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (bodies, failures) = load.finish().await;
    let total = bodies.values().sum::<usize>() + failures.len();
    let rate = total as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{failure:?}: {total} requests ({rate:.0}/s), answers {bodies:?}, {} failed",
        failures.len()
    );
    // The rate is what the machine gives (about 280/s alone, less beside other tests); the
    // floor only guards against a load that did not run.
    assert!(total > 500, "sustained load over several seconds: {total}");
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_and_restarted_on_the_same_address_under_load_loses_no_request() {
    operator_failure_under_load(Failure::KillAndRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_replica_killed_under_load_the_proxy_moves_to_another_replica() {
    operator_failure_under_load(Failure::KillOneOfTwo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_replica_hung_under_load_the_proxy_moves_to_another_replica() {
    operator_failure_under_load(Failure::FreezeOneOfTwo).await;
}

/// Many connections to a destination nobody has resolved yet, all at once (a pool opening at
/// pod start): every one waits for the operator's answer, not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_to_an_unresolved_service_all_wait_for_the_answer() {
    let pki = common::Pki::new("mesh");
    let b = api_pod(&pki, "b").await;
    let out = compile(&cluster(&[("web", b.running.inbound_addr)]), None);
    let op = Replica::start(&pki, "127.0.0.1:0".parse().unwrap(), &out);
    let client = caller(&pki, &caller_config(&out), vec![op.addr]).await;
    eventually("the proxy holds a stream", Duration::from_secs(5), || {
        op.streams() == 1
    })
    .await;
    let proxy = client.running.outbound_addr;
    let answers = futures::future::join_all((0..20).map(|_| get(proxy, "web.api"))).await;
    let failed: Vec<_> = answers.iter().filter(|r| r.as_deref() != Ok("b")).collect();
    assert!(
        failed.is_empty(),
        "{} of 20 failed: {failed:?}",
        failed.len()
    );
}

/// `web.api` splits 50/50 to `web-v1.api` and `web-v2.api`, none of which the caller's
/// ConfigMap lists: the proxy subscribes to the backends too, and the split works from the
/// first request on, over mTLS to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_whose_backends_are_known_only_from_the_stream_works() {
    let pki = common::Pki::new("mesh");
    let (v1, v2) = (api_pod(&pki, "v1").await, api_pod(&pki, "v2").await);
    let web = api_pod(&pki, "web itself").await;
    let w = cluster(&[
        ("web", web.running.inbound_addr),
        ("web-v1", v1.running.inbound_addr),
        ("web-v2", v2.running.inbound_addr),
    ])
    .with(traffic_policy("api", "canary", "web").spec(|s| {
        s.split = vec![
            SplitBackend {
                name: "web-v1".into(),
                weight: 50,
            },
            SplitBackend {
                name: "web-v2".into(),
                weight: 50,
            },
        ]
    }));
    let out = compile(&w, None);
    let op = Replica::start(&pki, "127.0.0.1:0".parse().unwrap(), &out);
    let client = caller(&pki, &caller_config(&out), vec![op.addr]).await;
    eventually("the proxy holds a stream", Duration::from_secs(5), || {
        op.streams() == 1
    })
    .await;
    let proxy = client.running.outbound_addr;
    let mut bodies = BTreeMap::new();
    for i in 0..60 {
        let body = get(proxy, "web.api")
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        *bodies.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        bodies.keys().map(String::as_str).collect::<Vec<_>>(),
        ["v1", "v2"],
        "{bodies:?}"
    );
    assert!(bodies.values().all(|n| *n >= 10), "{bodies:?}");
    // What the data path uses: the split Service and both backends, all learned.
    let cfg = client.config_json().await;
    let learned: Vec<&str> = cfg["config"]["outbound"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for name in ["web", "web-v1", "web-v2"] {
        assert!(learned.contains(&name), "{name} not in {learned:?}");
    }
}

/// A replica that accepts the stream and ends it at once (a crash loop behind a live port, a
/// proxy in between closing streams) must not be redialled at the minimum backoff forever:
/// with every sidecar of a cluster doing so, the handshakes alone would keep it down. Only a
/// stream that delivered a batch counts as a success that resets the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_ends_every_stream_at_once_is_redialled_with_growing_backoff() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pki = common::Pki::new("mesh");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = trellis_proxy::tls::server_config(&creds(&pki, OPERATOR_ID), &[b"h2"]).unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let counted = streams.clone();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // 200, then the end of the body: the stream opened and is over.
                let svc = hyper::service::service_fn(move |_req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
    let cfg = common::config("r1", common::inbound(MtlsMode::Permissive), vec![]);
    let _client = caller(&pki, &cfg, vec![addr]).await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let n = streams.load(Ordering::SeqCst);
    eprintln!("{n} streams opened in {:?}", t.elapsed());
    // 100 ms doubling: about 5 in 3 s (the minimum backoff alone would be about 25).
    assert!((2..=7).contains(&n), "{n} streams in 3 s");
}

/// The operator's addresses as a proxy may meet them after a rollout or a lost node: the
/// first refuses connections (the replica is gone, its port closed), the second accepts TCP
/// and never answers (a hung replica: the handshake waits for the connect timeout), and only
/// the third serves. The proxy must be on the live replica well before a connect timeout per
/// dead address has passed: a dead replica's address must not stall reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_operator_addresses_do_not_stall_the_stream() {
    let pki = common::Pki::new("mesh");
    let b = api_pod(&pki, "b").await;
    let out = compile(&cluster(&[("web", b.running.inbound_addr)]), None);
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Accepted by the kernel into the backlog; nothing ever reads or writes.
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let op = Replica::start(&pki, "127.0.0.1:0".parse().unwrap(), &out);
    let t = Instant::now();
    let client = caller(
        &pki,
        &caller_config(&out),
        vec![refused, hung.local_addr().unwrap(), op.addr],
    )
    .await;
    // The connect timeout alone is 3 s; dialling the addresses one after the other takes
    // longer than that before the live one is tried.
    let within = trellis_proxy::discovery::client::CONNECT_TIMEOUT - Duration::from_millis(500);
    eventually("the stream is up on the live replica", within, || {
        op.all_acked()
    })
    .await;
    eprintln!("stream acknowledged after {:?}", t.elapsed());
    assert_eq!(
        get(client.running.outbound_addr, "web.api")
            .await
            .as_deref(),
        Ok("b")
    );
}
