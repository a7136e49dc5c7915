//! Activation cache: the original model runs once over the calibration
//! windows and keeps the residual stream at every layer boundary, so that a
//! candidate plan starts at its first changed layer. Windows past the memory
//! budget spill to an anonymous temporary file (deleted when dropped).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use indicatif::ProgressBar;

use crate::forward::{Forward, KvCache, Logits, Options};
use crate::plan::Plan;
use crate::{Error, Result};

enum Stored {
    Memory(Vec<f32>),
    Disk { offset: u64 },
}

pub struct ActivationCache {
    /// Per window: residuals at boundaries `0..=L`, each `[T, hidden]`.
    windows: Vec<Stored>,
    seq_len: usize,
    hidden: usize,
    boundaries: usize,
    spill: Option<File>,
    /// Bytes kept in memory and spilled to disk.
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

fn spill_err(e: std::io::Error) -> Error {
    Error::Input(format!("activation cache spill file: {e}"))
}

impl ActivationCache {
    /// Run the original model over `windows`, keeping at most `budget_bytes`
    /// of residuals in memory.
    pub fn build(
        forward: &Forward,
        windows: &[Vec<u32>],
        budget_bytes: u64,
        progress: &ProgressBar,
    ) -> Result<ActivationCache> {
        let cfg = &forward.model.config;
        let layers = cfg.num_hidden_layers;
        let original = Plan::sequential(layers);
        let seq_len = windows.first().map_or(0, Vec::len);
        let mut cache = ActivationCache {
            windows: Vec::with_capacity(windows.len()),
            seq_len,
            hidden: cfg.hidden_size,
            boundaries: layers + 1,
            spill: None,
            memory_bytes: 0,
            disk_bytes: 0,
        };
        for window in windows {
            let out = forward.run(
                &original,
                window,
                &mut KvCache::new(layers),
                // Logits too, so that building the cache costs exactly one
                // full forward over the calibration tokens (the baseline the
                // search's cost is reported against).
                Options {
                    logits: Logits::All,
                    capture_residuals: true,
                },
            )?;
            let flat: Vec<f32> = out.residuals.concat();
            let bytes = flat.len() as u64 * 4;
            if cache.memory_bytes + bytes <= budget_bytes {
                cache.memory_bytes += bytes;
                cache.windows.push(Stored::Memory(flat));
            } else {
                if cache.spill.is_none() {
                    cache.spill = Some(tempfile::tempfile().map_err(spill_err)?);
                }
                let file = cache.spill.as_mut().expect("spill file");
                let offset = cache.disk_bytes;
                let raw: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
                file.write_all(&raw).map_err(spill_err)?;
                cache.disk_bytes += bytes;
                cache.windows.push(Stored::Disk { offset });
            }
            progress.inc(1);
        }
        Ok(cache)
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The original's residual stream of window `w` entering layer `boundary`
    /// (`boundary == L`: after the last layer, before the final norm).
    pub fn residual(&self, w: usize, boundary: usize) -> Result<Vec<f32>> {
        let n = self.seq_len * self.hidden;
        assert!(boundary < self.boundaries, "boundary out of range");
        match &self.windows[w] {
            Stored::Memory(v) => Ok(v[boundary * n..(boundary + 1) * n].to_vec()),
            Stored::Disk { offset } => {
                let mut raw = vec![0u8; n * 4];
                let at = offset + (boundary * n * 4) as u64;
                self.spill
                    .as_ref()
                    .expect("spill file")
                    .read_exact_at(&mut raw, at)
                    .map_err(spill_err)?;
                Ok(raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            }
        }
    }
}
