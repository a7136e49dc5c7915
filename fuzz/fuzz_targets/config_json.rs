//! Any text as `config.json`: parsing and validation return, not crash; an
//! accepted config is internally consistent.
#![no_main]

use std::path::Path;

use depthc::checkpoint::config::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = ModelConfig::from_hf_json(Path::new("config.json"), text) {
        assert!(c.num_hidden_layers > 0 && c.hidden_size > 0 && c.vocab_size > 0);
        assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
        let _ = c.parameter_count();
        let _ = c.to_hf_json();
    }
});
