//! Any bytes as `model.safetensors`: opening it (header, offsets, dtypes,
//! overlaps) and converting every tensor it lists must return, not crash.
#![no_main]

use depthc::checkpoint::safetensors::SafetensorsSource;
use depthc::checkpoint::TensorSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("depthc-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    std::fs::write(&file, data).unwrap();
    if let Ok(source) = SafetensorsSource::open_files(&[file]) {
        let names: Vec<String> = source.tensors().iter().map(|t| t.name.clone()).collect();
        for name in names {
            let _ = source.load_f32(&name);
        }
    }
});
