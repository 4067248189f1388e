//! The live view and the final summary, as plain text. On a terminal the view is redrawn in
//! place with two ANSI sequences (cursor home, clear to end); elsewhere (CI, pipes) the same
//! text is printed as periodic snapshots.

use std::fmt::Write as _;

use super::stats::EdgeView;

/// One row of the services table.
pub struct ServiceRow {
    pub key: String,
    pub kind: &'static str,
    pub replicas: u32,
    /// Replicas whose sidecar answers `/ready` (or, for plaintext clients, whose app runs).
    pub ready: u32,
    pub identity: Option<String>,
    /// Children that exited, with their status, for the row's note.
    pub exited: Vec<String>,
    /// The sidecars' own counters (config reloads, refused connections), when meshed.
    pub sidecar: Option<String>,
    /// Its pods by the proxy version they run (`v1=2 v2=1`), when meshed.
    pub versions: Option<String>,
}

/// Everything one frame shows.
pub struct Frame<'a> {
    pub header: &'a str,
    pub status_lines: &'a [String],
    pub services: &'a [ServiceRow],
    pub edges: &'a [EdgeView],
    /// Requests per backend after splits (`destination` is the backend Service).
    pub backends: &'a [EdgeView],
    /// Per `caller>backend`: retries and outlier ejections.
    pub backend_notes: &'a [(String, String)],
    /// Per plaintext-client edge: how its failed requests failed (e.g. `closed 2.0/s`).
    pub edge_notes: &'a [(String, String)],
    /// The sidecar rollout: state, batch, pods per version, why, last failures; and what the
    /// clients sent over the whole run.
    pub rollout: &'a [String],
    pub footer: &'a str,
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

/// Renders a frame as text (no escape sequences).
pub fn render(f: &Frame<'_>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", f.header);
    for l in f.status_lines {
        let _ = writeln!(o, "{l}");
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<24} {:<7} {:<9} IDENTITY (SPIFFE)",
        "WORKLOAD", "KIND", "READY"
    );
    for s in f.services {
        let mut line = format!(
            "{:<24} {:<7} {:<9} {}",
            s.key,
            s.kind,
            format!("{}/{}", s.ready, s.replicas),
            s.identity.as_deref().unwrap_or("- (no sidecar)")
        );
        if let Some(v) = &s.versions {
            let _ = write!(line, "  proxy {v}");
        }
        if let Some(sc) = &s.sidecar {
            let _ = write!(line, "  [{sc}]");
        }
        if !s.exited.is_empty() {
            let _ = write!(line, "  EXITED: {}", s.exited.join(", "));
        }
        let _ = writeln!(o, "{line}");
    }
    if !f.rollout.is_empty() {
        let _ = writeln!(o);
        for l in f.rollout {
            let _ = writeln!(o, "{l}");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<40} {:>8} {:>8} {:>9} {:>9} {:>5}  {:>8}",
        "EDGE (source -> destination)", "RPS", "SUCCESS", "P50", "P99", "MTLS", "TOTAL"
    );
    if f.edges.is_empty() {
        let _ = writeln!(o, "(no traffic yet)");
    }
    for e in f.edges {
        let name = format!("{} -> {}", e.key.source, e.key.destination);
        let success = e
            .success
            .map(|s| format!("{:.1}%", s * 100.0))
            .unwrap_or_else(|| "-".into());
        let mut line = format!(
            "{:<40} {:>8.1} {:>8} {:>9} {:>9} {:>5}  {:>8}",
            name,
            e.rps,
            success,
            ms(e.p50),
            ms(e.p99),
            if e.key.mtls { "yes" } else { "no" },
            e.total_requests as u64
        );
        if let Some((_, note)) = f
            .edge_notes
            .iter()
            .find(|(k, _)| *k == format!("{}>{}", e.key.source, e.key.destination))
        {
            let _ = write!(line, "  {note}");
        }
        let _ = writeln!(o, "{line}");
    }
    // Where requests went after splits, and what retries and outlier detection did.
    if !f.backends.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<40} {:>8}  (after TrafficPolicy splits, retries, ejections)",
            "BACKEND (caller -> backend)", "RPS"
        );
        for b in f.backends.iter().filter(|b| b.total_requests > 0.0) {
            let key = format!("{}>{}", b.key.source, b.key.destination);
            let note = f
                .backend_notes
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, n)| n.as_str())
                .unwrap_or("");
            let _ = writeln!(
                o,
                "{:<40} {:>8.1}  total {}  {note}",
                format!("{} -> {}", b.key.source, b.key.destination),
                b.rps,
                b.total_requests as u64
            );
        }
    }
    let _ = writeln!(o);
    o.push_str(f.footer);
    o
}

/// Redraws the terminal in place: cursor home, the frame, clear whatever the previous (longer)
/// frame left below.
pub fn redraw(text: &str) -> String {
    let mut s = String::from("\x1b[H");
    for line in text.lines() {
        s.push_str(line);
        s.push_str("\x1b[K\n");
    }
    s.push_str("\x1b[J");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::stats::EdgeKey;

    #[test]
    fn frame_shows_edges_with_units() {
        let edges = vec![EdgeView {
            key: EdgeKey {
                source: "frontend.shop".into(),
                destination: "catalog.shop".into(),
                mtls: true,
            },
            rps: 19.5,
            success: Some(0.975),
            p50: Some(0.0031),
            p99: Some(0.25),
            total_requests: 1000.0,
            total_successes: 975.0,
        }];
        let text = render(&Frame {
            header: "h",
            status_lines: &[],
            services: &[ServiceRow {
                key: "catalog.shop".into(),
                kind: "service",
                replicas: 3,
                ready: 2,
                identity: Some("spiffe://cluster.local/ns/shop/sa/catalog".into()),
                exited: vec!["catalog-2 sidecar (exit status: 1)".into()],
                sidecar: Some("reloads 2, refused 0".into()),
                versions: Some("v1=1 v2=2".into()),
            }],
            edges: &edges,
            backends: &[],
            backend_notes: &[],
            edge_notes: &[],
            rollout: &["ROLLOUT Progressing  batch 1 of 2".into()],
            footer: "",
        });
        assert!(text.contains("frontend.shop -> catalog.shop"), "{text}");
        for needle in [
            "19.5",
            "97.5%",
            "3.1ms",
            "250.0ms",
            "yes",
            "2/3",
            "EXITED",
            "proxy v1=1 v2=2",
            "ROLLOUT Progressing",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(redraw("a\nb").starts_with("\x1b[H"));
    }
}
