//! Seeded dropout masks.
//!
//! A mask for a `(b, c, l)` activation is drawn row by row: row `r = item * c + channel` uses a
//! `ChaCha8Rng` seeded with `seed` on stream `r`, and keeps element `j` when the `j`-th `u32` it draws is at
//! least `p * 2^32`. Rows are independent, so the mask is the same for any number of threads, and both
//! compute paths and the f64 test reference build the identical mask from the same `seed`.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Keep (1) / drop (0) mask of `n_rows * row_len` elements with drop probability `p`.
pub fn dropout_mask(seed: u64, n_rows: usize, row_len: usize, p: f64) -> Vec<u8> {
    let mut mask = vec![1u8; n_rows * row_len];
    if p <= 0.0 || row_len == 0 {
        return mask;
    }
    let threshold = (p * 4_294_967_296.0).min(4_294_967_295.0) as u32;
    mask.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(row as u64);
            for m in out.iter_mut() {
                *m = u8::from(rng.next_u32() >= threshold);
            }
        });
    mask
}

/// Scale applied to kept elements so that the expectation is unchanged (`1 / (1 - p)`).
pub fn keep_scale(p: f64) -> f64 {
    1.0 / (1.0 - p)
}
