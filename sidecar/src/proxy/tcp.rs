//! L4: splices two streams and counts what passed.

use crate::metrics::{OpenConn, TcpBytesLabels, TcpLabels};

use super::Shared;
use super::upstream::Io;

/// Copies both ways until both sides close (half-close is propagated), then records bytes.
pub async fn splice<A: Io, B: Io>(
    shared: &Shared,
    mut client: A,
    mut upstream: B,
    labels: TcpLabels,
) {
    let open = OpenConn::new(&shared.metrics, &labels);
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    drop(open);
    let (from_client, to_client) = match result {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "tcp splice ended with an error");
            return;
        }
    };
    for (flow, n) in [("from_client", from_client), ("to_client", to_client)] {
        shared
            .metrics
            .tcp_bytes
            .get_or_create(&TcpBytesLabels {
                direction: labels.direction,
                dst_service: labels.dst_service.clone(),
                tls: labels.tls,
                flow,
            })
            .inc_by(n);
    }
}
