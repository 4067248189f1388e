//! The local mesh's layout: which processes run, on which 127.0.0.1 ports, with which
//! identity, and where each pod's projected files live. Pure: computed from the topology and
//! the base port, so tests and the live view agree on every address.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use super::spec::{AppProtocol, Topology};

/// Why the ports cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "already in use on 127.0.0.1: {}; stop what holds them or pick other ports with \
         --base-port (this run needs {first}-{last})",
        taken.iter().map(|(p, w)| format!("port {p} ({w})")).collect::<Vec<_>>().join(", ")
    )]
    Taken {
        taken: Vec<(u16, String)>,
        first: u16,
        last: u16,
    },
    #[error("--base-port {base}: the mesh needs {count} ports and would pass 65535")]
    OutOfRange { base: u16, count: usize },
}

/// What a pod is.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// A replica of a service: serves `port`, fails at `failure_rate`, calls `calls`.
    Service {
        key: String,
        protocol: AppProtocol,
        service_port: u16,
        failure_rate: f64,
        latency_ms: u64,
        calls: Vec<String>,
    },
    /// A traffic generator calling `target` at `rate` requests per second.
    Client { target: String, rate: f64 },
}

/// The sidecar's listeners of a meshed pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
}

/// One pod: an app process and, when meshed, its sidecar.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    /// `<workload>-<replica>`.
    pub name: String,
    /// The Service or client name.
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub role: Role,
    /// The app's own port (a service's listener; a client's `/metrics`).
    pub app_port: u16,
    pub proxy: Option<ProxyPorts>,
    /// The projected volume (`config.json`, `ca.pem`, `labels`, `token`).
    pub dir: PathBuf,
}

impl Pod {
    pub fn workload_key(&self) -> String {
        format!("{}.{}", self.workload, self.namespace)
    }
}

/// A meshed pod's app port and sidecar ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub app: u16,
    pub proxy: ProxyPorts,
}

/// Every process and port of the local mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub identity_port: u16,
    pub pods: Vec<Pod>,
    /// Per meshed pod (by `namespace/name`), the ports it does not use now: a rollout starts the
    /// pod's replacement there while the pod still serves, then the two swap (a surge replica,
    /// as a Deployment's `maxSurge: 1` makes). Laid out after every pod's own ports, so the
    /// layout of the ports in use does not depend on them.
    pub spare: BTreeMap<String, Slot>,
}

impl Plan {
    /// Lays the topology out from `base`: the identity endpoint on `base`, then per pod its app
    /// port and, when meshed, outbound, inbound and admin ports.
    pub fn new(topo: &Topology, base: u16, state_dir: &Path) -> Result<Plan, PortError> {
        let mut next = u32::from(base) + 1;
        let mut take = || {
            let p = next;
            next += 1;
            p
        };
        let mut pods = Vec::new();
        for s in &topo.services {
            for r in 0..s.replicas {
                let name = format!("{}-{r}", s.name);
                let app = take();
                let proxy = (take(), take(), take());
                pods.push((
                    Pod {
                        dir: state_dir.join("pods").join(&s.namespace).join(&name),
                        name,
                        workload: s.name.clone(),
                        namespace: s.namespace.clone(),
                        service_account: s.service_account.clone(),
                        labels: s.pod_labels(),
                        role: Role::Service {
                            key: s.key(),
                            protocol: s.protocol,
                            service_port: s.port,
                            failure_rate: s.replica_failure_rate(r),
                            latency_ms: s.latency.as_millis() as u64,
                            calls: s.calls.clone(),
                        },
                        app_port: 0,
                        proxy: None,
                    },
                    app,
                    Some(proxy),
                ));
            }
        }
        for c in &topo.clients {
            let name = format!("{}-0", c.name);
            let app = take();
            let proxy = c.meshed.then(|| (take(), take(), take()));
            pods.push((
                Pod {
                    dir: state_dir.join("pods").join(&c.namespace).join(&name),
                    name,
                    workload: c.name.clone(),
                    namespace: c.namespace.clone(),
                    service_account: c.service_account.clone(),
                    labels: c.pod_labels(),
                    role: Role::Client {
                        target: c.target.clone(),
                        rate: c.rate,
                    },
                    app_port: 0,
                    proxy: None,
                },
                app,
                proxy,
            ));
        }
        let spare: Vec<(String, u32, (u32, u32, u32))> = pods
            .iter()
            .filter(|(_, _, proxy)| proxy.is_some())
            .map(|(pod, _, _)| {
                (
                    format!("{}/{}", pod.namespace, pod.name),
                    take(),
                    (take(), take(), take()),
                )
            })
            .collect();
        let last = next - 1;
        if last > u32::from(u16::MAX) {
            return Err(PortError::OutOfRange {
                base,
                count: (last - u32::from(base) + 1) as usize,
            });
        }
        let pods = pods
            .into_iter()
            .map(|(mut pod, app, proxy)| {
                pod.app_port = app as u16;
                pod.proxy = proxy.map(|(o, i, a)| ProxyPorts {
                    outbound: o as u16,
                    inbound: i as u16,
                    admin: a as u16,
                });
                pod
            })
            .collect();
        let spare = spare
            .into_iter()
            .map(|(key, app, (o, i, a))| {
                let slot = Slot {
                    app: app as u16,
                    proxy: ProxyPorts {
                        outbound: o as u16,
                        inbound: i as u16,
                        admin: a as u16,
                    },
                };
                (key, slot)
            })
            .collect();
        Ok(Plan {
            identity_port: base,
            pods,
            spare,
        })
    }

    /// Every port with what it is for, in order.
    pub fn ports(&self) -> Vec<(u16, String)> {
        let mut out = vec![(self.identity_port, "identity endpoint".to_string())];
        for p in &self.pods {
            out.push((p.app_port, format!("{} app", p.name)));
            if let Some(x) = p.proxy {
                out.push((x.outbound, format!("{} sidecar outbound", p.name)));
                out.push((x.inbound, format!("{} sidecar inbound", p.name)));
                out.push((x.admin, format!("{} sidecar admin", p.name)));
            }
        }
        for (pod, s) in &self.spare {
            let name = pod.rsplit('/').next().unwrap_or(pod);
            out.push((s.app, format!("{name} spare app")));
            out.push((s.proxy.outbound, format!("{name} spare sidecar outbound")));
            out.push((s.proxy.inbound, format!("{name} spare sidecar inbound")));
            out.push((s.proxy.admin, format!("{name} spare sidecar admin")));
        }
        out.sort();
        out
    }

    /// Swaps a meshed pod's ports with its spare ones (its replacement took over); returns the
    /// ports it had, now the spare.
    pub fn swap_slot(&mut self, pod_key: &str) -> Option<Slot> {
        let spare = *self.spare.get(pod_key)?;
        let pod = self
            .pods
            .iter_mut()
            .find(|p| format!("{}/{}", p.namespace, p.name) == pod_key)?;
        let old = Slot {
            app: pod.app_port,
            proxy: pod.proxy?,
        };
        pod.app_port = spare.app;
        pod.proxy = Some(spare.proxy);
        self.spare.insert(pod_key.to_string(), old);
        Some(old)
    }

    /// Binds every port once and releases it, so a taken port is reported by number and purpose
    /// before anything starts, instead of as one child's cryptic exit.
    pub fn probe_ports(&self) -> Result<(), PortError> {
        let ports = self.ports();
        let first = ports.first().map(|p| p.0).unwrap_or(0);
        let last = ports.last().map(|p| p.0).unwrap_or(0);
        let taken: Vec<_> = ports
            .into_iter()
            .filter(|(port, _)| {
                TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], *port))).is_err()
            })
            .collect();
        if taken.is_empty() {
            Ok(())
        } else {
            Err(PortError::Taken { taken, first, last })
        }
    }

    /// The replicas of a service.
    pub fn replicas_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| match &p.role {
            Role::Service { key: k, .. } => k == key,
            Role::Client { .. } => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::spec::parse_services;

    const TOPO: &str = r#"
services:
  - {name: web, namespace: a, port: 80, replicas: 2, calls: [api]}
  - {name: api, namespace: a, port: 81, failureRate: 0.5, failingReplicas: 1}
clients:
  - {name: load, namespace: a, meshed: true, target: web, rate: 5}
  - {name: legacy, namespace: a, meshed: false, target: web, rate: 1}
"#;

    #[test]
    fn ports_are_dense_unique_and_named() {
        let t = parse_services(Path::new("s.yaml"), TOPO).unwrap();
        let plan = Plan::new(&t, 20000, Path::new("/st")).unwrap();
        let ports = plan.ports();
        // identity + 3 meshed service pods * 4 + meshed client 4 + plaintext client 1, and a
        // spare set of 4 per meshed pod.
        assert_eq!(ports.len(), 1 + 3 * 4 + 4 + 1 + 4 * 4);
        let nums: Vec<u16> = ports.iter().map(|p| p.0).collect();
        assert_eq!(
            nums,
            (20000..20000 + ports.len() as u16).collect::<Vec<_>>()
        );
        let legacy = plan.pods.iter().find(|p| p.workload == "legacy").unwrap();
        assert!(legacy.proxy.is_none());
        assert_eq!(plan.replicas_of("web.a").count(), 2);
        assert_eq!(
            plan.pods[0].dir,
            Path::new("/st/pods/a/web-0"),
            "one projected volume per pod"
        );
        match &plan.pods[2].role {
            Role::Service { failure_rate, .. } => assert_eq!(*failure_rate, 0.5),
            r => panic!("{r:?}"),
        }
        assert!(Plan::new(&t, 65530, Path::new("/st")).is_err());
    }

    #[test]
    fn a_swap_trades_a_pods_ports_for_its_spare_ones_and_back() {
        let t = parse_services(Path::new("s.yaml"), TOPO).unwrap();
        let mut plan = Plan::new(&t, 20000, Path::new("/st")).unwrap();
        let before = plan.clone();
        let spare = plan.spare["a/web-0"];
        let old = plan.swap_slot("a/web-0").unwrap();
        assert_eq!(old.proxy, before.pods[0].proxy.unwrap());
        assert_eq!(plan.pods[0].proxy, Some(spare.proxy));
        assert_eq!(plan.pods[0].app_port, spare.app);
        assert_eq!(plan.spare["a/web-0"], old);
        assert_eq!(plan.pods[1], before.pods[1], "other pods keep their ports");
        plan.swap_slot("a/web-0").unwrap();
        assert_eq!(plan, before);
        assert!(
            plan.swap_slot("a/legacy-0").is_none(),
            "no sidecar, no spare"
        );
    }

    #[test]
    fn a_taken_port_is_named() {
        let t = parse_services(Path::new("s.yaml"), TOPO).unwrap();
        let hold = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hold.local_addr().unwrap().port();
        // Put the held port at the second slot: the first pod's app port.
        let plan = Plan::new(&t, port - 1, Path::new("/st")).unwrap();
        let e = plan.probe_ports().unwrap_err().to_string();
        assert!(e.contains(&format!("port {port} (web-0 app)")), "{e}");
    }
}
