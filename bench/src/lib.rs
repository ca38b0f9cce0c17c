//! What essayflow's load generators share.

use anyhow::bail;

/// The `p`-quantile (0 to 1, nearest rank) of ascending `sorted` values; `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let index = (last as f64 * p.clamp(0.0, 1.0)).round() as usize;
    Some(sorted[index.min(last)])
}

/// Refuses a target that is not on this machine (`http://127.x.x.x:PORT`, `localhost`,
/// `[::1]`): the generators are for loopback benchmarks only.
pub fn require_loopback(url: &str) -> anyhow::Result<()> {
    let host = url.split("://").nth(1).unwrap_or_default();
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        bail!("the load generator only targets loopback addresses, not {url:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values = [1, 2, 3, 4, 5];
        assert_eq!(percentile(&values, 0.5), Some(3));
        assert_eq!(percentile(&values, 1.0), Some(5));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn only_loopback_targets_pass() {
        assert!(require_loopback("http://127.0.0.1:8080").is_ok());
        assert!(require_loopback("http://localhost:1").is_ok());
        assert!(require_loopback("http://example.org").is_err());
    }
}
