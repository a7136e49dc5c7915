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

/// As [`new_directory`]; with `replace` (`--force`) an existing `out` is
/// replaced, and only once the new one is complete.
pub fn write_directory<T>(
    out: &Path,
    replace: bool,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    if out.exists() && !replace {
        return Err(Error::output(
            out,
            "already exists; choose a new output directory",
        ));
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::output(out, "the output needs a UTF-8 directory name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
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
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
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
