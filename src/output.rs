//! Output directories that never end half-written: filled under a temporary
//! sibling name (`.NAME.partial-PID`) and renamed into place when complete;
//! on error the temporary directory is removed.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Create `out` (which must not exist) by running `fill` on a temporary
/// sibling directory, then renaming it to `out`.
pub fn new_directory<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if out.exists() {
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
    let result = fill(&tmp).and_then(|v| {
        std::fs::rename(&tmp, out)
            .map(|_| v)
            .map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
