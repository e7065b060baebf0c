//! Seeded dropout masks.
//!
//! A mask for a `(b, c, l)` activation is drawn row by row, row `r = item * c + channel`, from a
//! counter-based generator: the SplitMix64 finaliser of `(seed, r, j / 4)` gives 64 bits, split into four
//! 16-bit uniforms for elements `j .. j + 4`; an element is dropped when its uniform is below
//! `round(p * 65536)` (so `p` is realised to within `2^-17`). Rows are independent, so the mask is the same
//! for any number of threads, and both compute paths and the f64 test reference build the identical mask
//! from the same `seed`. The backbones draw one `seed` per block from their seeded `ChaCha8Rng`.
//! Why not ChaCha per element: at batch 64 the first block alone needs 17 M draws per step; the finaliser
//! is several times cheaper and statistically ample for dropout.

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Keep (1) / drop (0) mask of `n_rows * row_len` elements with drop probability `p`.
pub fn dropout_mask(seed: u64, n_rows: usize, row_len: usize, p: f64) -> Vec<u8> {
    if row_len == 0 {
        return vec![];
    }
    if p <= 0.0 {
        return vec![1u8; n_rows * row_len];
    }
    let threshold = (p * 65536.0).round().min(65536.0) as u32;
    super::par_rows_uninit(
        n_rows,
        row_len,
        || (),
        |_, row, out| {
            let key = mix(seed ^ mix(row as u64));
            let mut groups = out.chunks_exact_mut(4);
            let mut group = 0u64;
            for chunk in &mut groups {
                let h = mix(key.wrapping_add(group));
                chunk[0].write(u8::from((h & 0xFFFF) as u32 >= threshold));
                chunk[1].write(u8::from(((h >> 16) & 0xFFFF) as u32 >= threshold));
                chunk[2].write(u8::from(((h >> 32) & 0xFFFF) as u32 >= threshold));
                chunk[3].write(u8::from((h >> 48) as u32 >= threshold));
                group += 1;
            }
            let h = mix(key.wrapping_add(group));
            for (q, m) in groups.into_remainder().iter_mut().enumerate() {
                m.write(u8::from(((h >> (16 * q)) & 0xFFFF) as u32 >= threshold));
            }
        },
    )
}

/// Scale applied to kept elements so that the expectation is unchanged (`1 / (1 - p)`).
pub fn keep_scale(p: f64) -> f64 {
    1.0 / (1.0 - p)
}
