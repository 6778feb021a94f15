//! Wall-clock time for display fields (`acquired_at`, `waiting since`).
//!
//! Waits and timeouts use tokio's monotonic clock instead; wall-clock jumps never shorten or
//! lengthen a wait.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
