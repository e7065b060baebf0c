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
        |_, row, out| fill_row(mix(seed ^ mix(row as u64)), threshold, out),
    )
}

/// One row of the mask from its key: four elements per hash of `key + group`.
///
/// Why the copies: the hashes of a row are independent, so the loop vectorises (four or eight 64-bit
/// lanes), but only where the compiler may use AVX2 or AVX-512; built for baseline x86-64 it ran one
/// hash at a time and was ~5 % of a TinyCNN training step.
fn fill_row(key: u64, threshold: u32, out: &mut [std::mem::MaybeUninit<u8>]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
        fn avx512(key: u64, threshold: u32, out: &mut [std::mem::MaybeUninit<u8>]) {
            fill_row_body(key, threshold, out)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(key: u64, threshold: u32, out: &mut [std::mem::MaybeUninit<u8>]) {
            fill_row_body(key, threshold, out)
        }
        if super::has_avx512() {
            // SAFETY: the CPU supports the features enabled on `avx512` (checked just above).
            return unsafe { avx512(key, threshold, out) };
        }
        if super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { avx2(key, threshold, out) };
        }
    }
    fill_row_body(key, threshold, out)
}

#[inline(always)]
fn fill_row_body(key: u64, threshold: u32, out: &mut [std::mem::MaybeUninit<u8>]) {
    let (groups, rest) = out.as_chunks_mut::<4>();
    for (group, chunk) in groups.iter_mut().enumerate() {
        let h = mix(key.wrapping_add(group as u64));
        for (q, m) in chunk.iter_mut().enumerate() {
            m.write(u8::from(((h >> (16 * q)) & 0xFFFF) as u32 >= threshold));
        }
    }
    let h = mix(key.wrapping_add(groups.len() as u64));
    for (q, m) in rest.iter_mut().enumerate() {
        m.write(u8::from(((h >> (16 * q)) & 0xFFFF) as u32 >= threshold));
    }
}

/// Scale applied to kept elements so that the expectation is unchanged (`1 / (1 - p)`).
pub fn keep_scale(p: f64) -> f64 {
    1.0 / (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::{fill_row, mix};
    use std::mem::MaybeUninit;

    /// The row loop as written before the vector copies, one hash at a time: the reference twin.
    fn fill_row_reference(key: u64, threshold: u32, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut groups = out.chunks_exact_mut(4);
        let mut group = 0u64;
        for chunk in &mut groups {
            let h = mix(key.wrapping_add(group));
            chunk[0] = u8::from((h & 0xFFFF) as u32 >= threshold);
            chunk[1] = u8::from(((h >> 16) & 0xFFFF) as u32 >= threshold);
            chunk[2] = u8::from(((h >> 32) & 0xFFFF) as u32 >= threshold);
            chunk[3] = u8::from((h >> 48) as u32 >= threshold);
            group += 1;
        }
        let h = mix(key.wrapping_add(group));
        for (q, m) in groups.into_remainder().iter_mut().enumerate() {
            *m = u8::from(((h >> (16 * q)) & 0xFFFF) as u32 >= threshold);
        }
        out
    }

    #[test]
    fn vector_rows_equal_the_reference() {
        let lengths = (0..70).chain([1021, 16380]);
        for (i, n) in lengths.enumerate() {
            for threshold in [0, 1, 6554, 32768, 65535, 65536] {
                let key = mix(0xdead_beef ^ i as u64);
                let mut out = vec![MaybeUninit::<u8>::uninit(); n];
                fill_row(key, threshold, &mut out);
                // SAFETY: `fill_row` writes every element of its row.
                let got: Vec<u8> = out.iter().map(|m| unsafe { m.assume_init() }).collect();
                assert_eq!(
                    got,
                    fill_row_reference(key, threshold, n),
                    "n {n}, threshold {threshold}"
                );
            }
        }
    }
}
