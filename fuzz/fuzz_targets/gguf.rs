//! Any bytes as a `.gguf` file: the reader, the model config and tokenizer
//! taken from its metadata (and encoding a text with it), and loading the
//! model must return, not crash.
#![no_main]

use depthc::checkpoint::Checkpoint;
use depthc::model::Model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = std::env::temp_dir().join(format!("depthc-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&file, data).unwrap();
    if let Ok(ckpt) = Checkpoint::open(&file) {
        if let Some(tokenizer) = &ckpt.tokenizer {
            let _ = tokenizer.encode("To be, or not to be: 1234 ab  abc");
        }
        let cache = depthc::model::WeightCache::new(depthc::model::DEFAULT_WIDEN_BUDGET);
        let _ = Model::load(&ckpt.source, &ckpt.config, &cache);
    }
});
