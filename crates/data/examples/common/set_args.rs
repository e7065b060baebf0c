//! The command line shared by the examples that redraw a synthetic set's stars: `SEED N
//! [PIXELS_PER_CAMERA]`, as `starflow synth --seed SEED --n N --pixels-per-camera PPC` drew them.
//! A bad argument exits 2 with the usage, no panic.

use starflow_data::synth::SynthConfig;

/// The set named on `example`'s command line; `default_n` stars when N is not given.
pub fn synth_config(example: &str, default_n: usize) -> SynthConfig {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| {
        match args.get(i) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!(
                "{example}: `{v}` is not a whole number; usage: {example} SEED N [PIXELS_PER_CAMERA]"
            );
            std::process::exit(2)
        }),
    }
    };
    SynthConfig {
        seed: arg(0, 42) as u64,
        n: arg(1, default_n),
        pixels_per_camera: arg(2, 4096),
        ..SynthConfig::default()
    }
}
