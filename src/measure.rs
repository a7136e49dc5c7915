//! Measurement helpers, in one place: the process's peak resident memory
//! (Linux `/proc/self`), the median of repeated timings, and the wall time
//! and peak memory of a stage of work.

use std::cell::RefCell;
use std::time::Instant;

use serde::Serialize;

/// Start measuring the peak resident set afresh (Linux: reset the
/// high-water mark, `/proc/self/clear_refs` 5).
pub fn reset_peak_rss() {
    #[cfg(target_os = "linux")]
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident set since the last [`reset_peak_rss`] (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory the kernel could give this process now without swapping
/// (Linux `MemAvailable`); `None` where it does not say.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The median of `v` (the mean of the middle two for an even count; NaN
/// when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Wall time and peak resident memory of one stage of work.
#[derive(Debug, Clone, Serialize)]
pub struct StageCost {
    pub stage: String,
    pub seconds: f64,
    /// The process's peak resident set during the stage (Linux; `None`
    /// where the kernel does not report it).
    pub peak_rss_bytes: Option<u64>,
}

/// Run the stage `f`, appending its wall time and peak resident memory to
/// `stages`.
pub fn timed<T, E>(
    stages: &RefCell<Vec<StageCost>>,
    stage: String,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    reset_peak_rss();
    let t = Instant::now();
    let r = f()?;
    stages.borrow_mut().push(StageCost {
        stage,
        seconds: t.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
