//! Socket helpers for the tests of the operator's listeners.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Whether the server closes `s` within `within` (what it sends meanwhile is read and dropped).
pub async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
