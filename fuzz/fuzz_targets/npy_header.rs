//! libFuzzer target for `starflow_data::npy::parse_header`, the one parser that reads bytes straight from
//! user files. The property lives in `crates/data/tests/npy_property/mod.rs` and is shared with the stable
//! seeded test `crates/data/tests/fuzz_header.rs`, which CI runs, so both check exactly the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/data/tests/npy_property/mod.rs"]
mod npy_property;

fuzz_target!(|data: &[u8]| {
    npy_property::check(data);
});
