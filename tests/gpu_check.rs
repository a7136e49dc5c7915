//! `scripts/gpu_check.py run --dry-run`: the prepared GPU run, on tiny shapes
//! with the CPU provider, so that the script a lent GPU machine runs once is
//! itself tested: checkpoints written, every model emitted in float16 in both
//! op modes and both forms, validated, benchmarked, and the table printed.

mod common;

use std::path::PathBuf;

#[test]
fn gpu_check_dry_run_passes_on_cpu() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = common::cache_dir().join("venv/bin/python");
    assert!(python.exists(), "run scripts/setup.sh first");
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python)
        .arg(root.join("scripts/gpu_check.py"))
        .args(["run", "--dry-run", "--runs", "1", "--work"])
        .arg(work.path())
        .arg("--depthc")
        .arg(env!("CARGO_BIN_EXE_depthc"))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2 shapes x 2 op modes x (baseline + 2 forms) validated.
    assert_eq!(stdout.matches(", tokens agree)").count(), 12, "{stdout}");
    // 2 shapes x 2 op modes x 2 forms x batch 1 and 8 benchmarked.
    let rows = stdout
        .lines()
        .filter(|l| l.starts_with("tiny-") && l.contains(" cpu "))
        .count();
    assert_eq!(rows, 16, "{stdout}");
}
