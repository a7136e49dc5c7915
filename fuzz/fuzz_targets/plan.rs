//! Any text as a `--plan` for a model of 1 to 64 layers: parsing returns, not
//! crashes; an accepted plan covers every layer once, in order, with groups of
//! adjacent layers, and its canonical form parses back to the same plan.
#![no_main]

use depthc::plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, spec)) = data.split_first() else {
        return;
    };
    let layers = usize::from(n % 64) + 1;
    let Ok(spec) = std::str::from_utf8(spec) else {
        return;
    };
    if let Ok(plan) = Plan::parse(spec, layers) {
        let flat: Vec<usize> = plan.steps.iter().flat_map(|s| s.layers().to_vec()).collect();
        assert_eq!(flat, (0..layers).collect::<Vec<_>>());
        for g in plan.groups() {
            assert!(g.layers.len() >= 2);
            assert!(g.layers.windows(2).all(|w| w[1] == w[0] + 1));
        }
        assert_eq!(Plan::parse(&plan.to_string(), layers).unwrap(), plan);
    }
});
