//! `trellis dev`'s identity path without the proxy: the operator's identity endpoint, started
//! exactly as `trellis dev --credentials endpoint` starts it (mesh CA, serving certificate for
//! 127.0.0.1, TokenReview through the local stand-in), issues a certificate to the sidecar's
//! own identity client reading a pod volume `trellis dev` wrote, and refuses a token it did
//! not mint.

use std::path::Path;
use std::time::Duration;

use trellis_operator::dev::control::{self, MeshParams};
use trellis_operator::dev::creds::{self, Inputs, Mode};
use trellis_operator::dev::plan::Plan;
use trellis_operator::dev::spec;
use trellis_operator::dev::tokenreview::{TokenAuthority, TokenOwner};
use trellis_operator::dev::volume;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_local_identity_endpoint_certifies_a_sidecar_by_its_minted_token() {
    let tmp = tempfile::tempdir().unwrap();
    let topo = spec::parse_services(
        Path::new("services.yaml"),
        "services:\n  - {name: catalog, namespace: shop, port: 9080}\n",
    )
    .unwrap();
    let plan = Plan::new(&topo, free_port(), tmp.path()).unwrap();
    let params = MeshParams {
        trust_domain: "cluster.local".into(),
        workload_ttl: Duration::from_secs(3600),
        root_validity: Duration::from_secs(86400),
    };
    let ca = std::sync::Arc::new(control::new_ca(&params).unwrap());
    let tokens = TokenAuthority::default();
    let pod = &plan.pods[0];
    let token = tokens.mint(TokenOwner {
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        pod_name: pod.name.clone(),
        pod_uid: "uid".into(),
    });
    let url = format!("https://127.0.0.1:{}", plan.identity_port);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let metrics = trellis_operator::dev::operator_metrics::OperatorMetrics::default();
    let (args, desc) = creds::start(Inputs {
        mode: Mode::Endpoint,
        ca: &ca,
        plan: &plan,
        params: &params,
        state_dir: tmp.path(),
        tokens: &tokens,
        identity_url: &url,
        shutdown: &shutdown,
        metrics: &metrics,
    })
    .await
    .unwrap();
    assert!(desc.contains("local stand-in"), "{desc}");
    assert_eq!(
        args.values().next().unwrap(),
        &vec!["--identity-endpoint".to_string(), url.clone()]
    );

    // The pod volume as trellis dev writes it (config content is irrelevant to the client).
    let files = control::volume_files("{}", ca.roots_pem(), pod, &token);
    volume::write(&pod.dir, &files).unwrap();
    let (tx, mut rx) = trellis_proxy::creds::channel();
    let client_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(trellis_proxy::identity::run_identity_client(
        url.clone(),
        pod.dir.clone(),
        trellis_proxy::fswatch::spawn(vec![pod.dir.clone()], client_stop.clone()),
        tx,
        client_stop.clone(),
    ));
    let creds = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the sidecar's identity client got a certificate");
    assert_eq!(creds.spiffe_id, "spiffe://cluster.local/ns/shop/sa/catalog");
    client_stop.cancel();

    // A token trellis dev did not mint gets no certificate.
    let other = tmp.path().join("other");
    let mut forged = files.clone();
    forged.insert("token".into(), b"trellis-dev.forged".to_vec());
    volume::write(&other, &forged).unwrap();
    let (tx, mut rx) = trellis_proxy::creds::channel();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(trellis_proxy::identity::run_identity_client(
        url,
        other.clone(),
        trellis_proxy::fswatch::spawn(vec![other], stop.clone()),
        tx,
        stop.clone(),
    ));
    let got = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    assert!(
        got.is_err() || rx.borrow().is_none(),
        "a forged token must not be certified"
    );
    stop.cancel();

    // What the endpoint did is in the operator's registry, which trellis dev serves.
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("trellis_operator_identity_issuances_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("trellis_operator_identity_rejections_total{reason="),
        "{text}"
    );
    shutdown.cancel();
}
