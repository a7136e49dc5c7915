//! Output directories that never end half-written: filled under a temporary
//! sibling name (`.NAME.partial-PID`) and renamed into place when complete;
//! on error the temporary directory is removed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Error, Result};

/// Temporary directories being filled, removed by the interrupt handler.
static PARTIAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// On Ctrl-C (SIGINT/SIGTERM), remove every temporary output directory and
/// exit with status 130, so that nothing half-written stays behind.
pub fn remove_partial_outputs_on_interrupt() {
    let _ = ctrlc::set_handler(|| {
        let dirs = PARTIAL.lock().map(|d| d.clone()).unwrap_or_default();
        for d in dirs {
            let _ = std::fs::remove_dir_all(&d);
        }
        eprintln!("interrupted: partial output removed");
        std::process::exit(130);
    });
}

fn track(dir: &Path, add: bool) {
    if let Ok(mut d) = PARTIAL.lock() {
        if add {
            d.push(dir.to_path_buf());
        } else {
            d.retain(|p| p != dir);
        }
    }
}

/// Create `out` (which must not exist) by running `fill` on a temporary
/// sibling directory, then renaming it to `out`.
pub fn new_directory<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    write_directory(out, false, fill)
}

/// Fails early, before any long work, when `out` cannot become a new output
/// directory: it exists (and `replace` is not set), or its parent is not a
/// writable place. `force_flag` says whether the command offers --force.
pub fn check_output(out: &Path, replace: bool, force_flag: bool) -> Result<()> {
    if out.exists() && !replace {
        let hint = if force_flag {
            "choose another output directory, or pass --force to replace it once the new one \
             is complete"
        } else {
            "choose another output directory, or remove it first"
        };
        return Err(Error::output(out, format!("already exists; {hint}")));
    }
    if out.file_name().and_then(|n| n.to_str()).is_none() {
        return Err(Error::output(
            out,
            "the output needs a UTF-8 directory name",
        ));
    }
    let parent = parent_of(out);
    if !parent.is_dir() {
        let why = if parent.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(Error::output(
            out,
            format!("cannot write here: {} {why}", parent.display()),
        ));
    }
    Ok(())
}

fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// As [`new_directory`]; with `replace` (`--force`) an existing `out` is
/// replaced, and only once the new one is complete.
pub fn write_directory<T>(
    out: &Path,
    replace: bool,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    check_output(out, replace, replace)?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let parent = parent_of(out);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| {
        Error::output(
            out,
            format!("cannot create the output here ({}: {e})", tmp.display()),
        )
    })?;
    track(&tmp, true);
    let result = fill(&tmp).and_then(|v| {
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out)
            .map(|_| v)
            .map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    track(&tmp, false);
    result
}
