//! Winograd minimal-filtering convolutions `F(m, r)` for the wide k3 and k5 layers.
//!
//! Why: TinyCNN's k5 32 → 32 and 32 → 64 layers are two thirds of its arithmetic, and the direct kernels
//! already run `gemm`'s microkernel near the core's peak, so only fewer multiplications make them faster.
//! `F(m, r)` computes `m` outputs of an `r`-tap correlation from `α = m + r − 1` inputs with `α` products
//! instead of `m r`: with `α = 8`, `F(4, 5)` needs 2.5× fewer and `F(6, 3)` 2.25× fewer. Per tile of
//! `m` outputs: `y = Aᵀ [(G w) ⊙ (Bᵀ d)]`; over channels the `⊙` becomes one `gemm` per point `ξ`,
//! `M_ξ (c_out × tiles) = U_ξ (c_out × c_in) V_ξ (c_in × tiles)`.
//!
//! The transforms come from Toom–Cook at the points `0, ±1, ±2, ±1/2` and `∞`: `G` evaluates the
//! filter at the points, `Aᵀ` is the transpose of the evaluation of the output polynomial, and `Bᵀ` the
//! transpose of the interpolation matrix (the inverse of the `α × α` evaluation). The correlation is the
//! transpose of a polynomial product, which is why these three reproduce it exactly in exact
//! arithmetic; in f32 the error is a few units of 1e-6 relative (measured against f64 sums in
//! `tests/ops.rs`).
//!
//! The kernels run the transforms of the two tile sizes the layers use (`F(4, 5)`, `F(6, 3)`) written
//! out (`bt_block`, `at_block`, `a_block`): the 20 zeros of `Bᵀ` drop out and the rows of `±p`
//! share their even and odd sums. Each row segment is first split by phase (`deinterleave`), so a
//! register block of eight tiles is eight vector loads rather than 64 scalar ones. The matrix forms stay
//! as their twins (`*_reference`) and for other tile sizes. Measured on TinyCNN at batch 64 and
//! 16,384 px (AMD EPYC, 2 threads): eval forward 0.203–0.213 s → 0.190–0.195 s.
//!
//! The three passes of a layer are one kernel each:
//! - forward: [`conv_fwd`], a valid correlation;
//! - input gradient: the same kernel on `dy` with the filter flipped and transposed and `r − 1` zeros of
//!   virtual padding on both sides ([`conv_bwd_input`]);
//! - weight gradient: the transpose of the forward's bilinear form, `dW = Gᵀ Σ_tiles (A dy) ⊙ (Bᵀ x)`,
//!   again one `gemm` per point, with the tiles as the inner dimension ([`conv_bwd_weight`]).
//!
//! The direct kernels in [`super::conv1d`] stay as the twins these are tested against, and run the
//! shapes [`for_dims`] declines (fewer than 8 channels a side, short rows, other kernel widths; a single
//! input channel has kernels of its own there).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::conv1d::{gemm_into, inner_parallelism, Dims, View};
use super::{lane_sums, par_rows_uninit, simd_fn, Elem};

/// Points per tile transform: 7 finite interpolation points and `∞`.
const ALPHA: usize = 8;
/// The finite points, in the order Toom–Cook takes them (small magnitudes first keep `Bᵀ` tame).
const POINTS: [f64; ALPHA - 1] = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5];
/// Most tiles per chunk (fewer for rows shorter than that): a chunk's transformed input and products
/// (`8 × c × 256` floats each) stay in L2.
const CHUNK: usize = 256;

/// The transforms of `F(m, r)` with `m + r − 1 = 8`, row-major in f64.
#[derive(Debug, Clone)]
pub struct Transforms {
    /// Outputs per tile.
    pub m: usize,
    /// Filter taps.
    pub r: usize,
    /// `Aᵀ`, `m × α`.
    pub at: Vec<f64>,
    /// `G`, `α × r`.
    pub g: Vec<f64>,
    /// `Bᵀ`, `α × α`.
    pub bt: Vec<f64>,
}

/// The evaluation matrix of polynomials with `n` coefficients at [`POINTS`] and `∞` (`α × n`): row `ξ`
/// holds `p_ξ^i`; the row of `∞` picks the leading coefficient.
fn evaluation(n: usize) -> Vec<f64> {
    let mut e = vec![0.0; ALPHA * n];
    for (xi, p) in POINTS.iter().enumerate() {
        for i in 0..n {
            e[xi * n + i] = p.powi(i as i32);
        }
    }
    e[(ALPHA - 1) * n + n - 1] = 1.0;
    e
}

/// The inverse of a square row-major matrix by Gauss–Jordan with partial pivoting.
fn inverse(a: &[f64], n: usize) -> Vec<f64> {
    let mut aug: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = a[i * n..(i + 1) * n].to_vec();
            row.extend((0..n).map(|j| f64::from(u8::from(i == j))));
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| aug[i][col].abs().total_cmp(&aug[j][col].abs()))
            .unwrap_or(col);
        aug.swap(col, pivot);
        let p = aug[col][col];
        aug[col].iter_mut().for_each(|v| *v /= p);
        let pivot_row = aug[col].clone();
        for (i, row) in aug.iter_mut().enumerate() {
            let f = row[col];
            if i != col && f != 0.0 {
                row.iter_mut()
                    .zip(&pivot_row)
                    .for_each(|(v, q)| *v -= f * q);
            }
        }
    }
    aug.into_iter().flat_map(|row| row[n..].to_vec()).collect()
}

impl Transforms {
    /// The transforms for an `r`-tap filter (`2 ≤ r ≤ 6`, so that a tile has at least 3 outputs).
    pub fn new(r: usize) -> Option<Self> {
        if !(2..=6).contains(&r) {
            return None;
        }
        let m = ALPHA + 1 - r;
        let e_m = evaluation(m);
        let c = inverse(&evaluation(ALPHA), ALPHA);
        let at = (0..m * ALPHA)
            .map(|k| e_m[(k % ALPHA) * m + k / ALPHA])
            .collect();
        let bt = (0..ALPHA * ALPHA)
            .map(|k| c[(k % ALPHA) * ALPHA + k / ALPHA])
            .collect();
        Some(Self {
            m,
            r,
            at,
            g: evaluation(r),
            bt,
        })
    }
}

/// The transforms for a convolution of shape `d`, or `None` where the direct kernels are the better
/// choice: kernel widths other than 3 and 5, fewer than 8 channels on either side (the per-point
/// products would be too thin for `gemm`), or rows shorter than a few tiles. Built once per process
/// and width, not per call.
pub(crate) fn for_dims(d: Dims) -> Option<&'static Transforms> {
    let wide = d.c_in >= 8 && d.c_out >= 8;
    if !(d.k == 3 || d.k == 5) || !wide || d.l_out() < 64 {
        return None;
    }
    static CACHE: [OnceLock<Option<Transforms>>; 7] = [const { OnceLock::new() }; 7];
    CACHE
        .get(d.k)?
        .get_or_init(|| Transforms::new(d.k))
        .as_ref()
}

/// A correlation of `x (b, c_in, l_in)` with `w (c_out, c_in, r)` and `pad` virtual zeros on both sides,
/// `l_out` outputs per row.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c_in: usize,
    c_out: usize,
    l_in: usize,
    pad: usize,
    l_out: usize,
}

/// The filter in the transformed domain, `U_ξ = (G w)_ξ` as `(α, c_out, c_in)`.
fn filter_transform<T: Elem>(tf: &Transforms, w: &[T], c_out: usize, c_in: usize) -> Vec<T> {
    let r = tf.r;
    let mut u = vec![T::of(0.0); ALPHA * c_out * c_in];
    for xi in 0..ALPHA {
        for co in 0..c_out {
            for ci in 0..c_in {
                let taps = &w[(co * c_in + ci) * r..(co * c_in + ci + 1) * r];
                let v: f64 = (0..r).map(|j| tf.g[xi * r + j] * taps[j].to64()).sum();
                u[(xi * c_out + co) * c_in + ci] = T::of(v);
            }
        }
    }
    u
}

/// Tiles transformed per register block (one AVX2 vector of f32).
const LANES: usize = 8;
/// The most outputs a tile has (`r = 3`).
const MAX_M: usize = 6;

/// The transforms in the kernel's element type, laid out for the register-blocked loops.
struct Coeffs<T> {
    m: usize,
    /// `Bᵀ`, `α × α`.
    bt: [T; ALPHA * ALPHA],
    /// `Aᵀ`, `m × α`, padded to [`MAX_M`] rows.
    at: [T; MAX_M * ALPHA],
}

impl<T: Elem> Coeffs<T> {
    fn new(tf: &Transforms) -> Self {
        Self {
            m: tf.m,
            bt: std::array::from_fn(|k| T::of(tf.bt[k])),
            at: std::array::from_fn(|k| T::of(tf.at.get(k).copied().unwrap_or(0.0))),
        }
    }
}

/// `row[start..][..len]`, read in place where it lies inside the row, else copied into `seg` with zeros
/// outside the row: the tiles then read it without bounds checks.
#[inline(always)]
fn padded_segment<'a, T: Elem>(
    row: &'a [T],
    start: isize,
    len: usize,
    seg: &'a mut Vec<T>,
) -> &'a [T] {
    if start >= 0 && start as usize + len <= row.len() {
        return &row[start as usize..start as usize + len];
    }
    seg.clear();
    seg.resize(len, T::of(0.0));
    let lo = start.max(0);
    let hi = (start + len as isize).min(row.len() as isize);
    if lo < hi {
        let at = (lo - start) as usize;
        seg[at..at + (hi - lo) as usize].copy_from_slice(&row[lo as usize..hi as usize]);
    }
    seg
}

/// One register block of a transform: `init + Σ_{q < n} coefs[q * step] src[q]`, lane by lane (the
/// rows of `Bᵀ` or `Aᵀ` with `step` 1, their columns with `step` α).
#[inline(always)]
fn combine<T: Elem, const N: usize>(
    src: &[[T; LANES]; N],
    n: usize,
    coefs: &[T],
    step: usize,
    init: T,
) -> [T; LANES] {
    let mut acc = [init; LANES];
    for (q, sq) in src.iter().enumerate().take(n) {
        let coef = coefs[q * step];
        for (a, &v) in acc.iter_mut().zip(sq) {
            *a += coef * v;
        }
    }
    acc
}

/// Tiles rounded up to whole register blocks.
fn padded_tiles(nt: usize) -> usize {
    nt.div_ceil(LANES) * LANES
}

/// One register block: eight tiles' values of one transform point, lane `l` for tile `tb + l`.
type Lanes<T> = [T; LANES];

/// `f(l)` for every lane (the closures below are element-wise, so the compiler keeps them in vectors).
/// A plain loop, not `std::array::from_fn`, whose inner function is not inlined into the AVX2 copies
/// of the kernels and so runs without their features.
#[inline(always)]
fn lanes<T: Elem>(f: impl Fn(usize) -> T) -> Lanes<T> {
    let mut out = [T::of(0.0); LANES];
    for (l, o) in out.iter_mut().enumerate() {
        *o = f(l);
    }
    out
}

/// `N` register blocks, `f(k)` for block `k` (a loop, as [`lanes`]).
#[inline(always)]
fn blocks<T: Elem, const N: usize>(f: impl Fn(usize) -> Lanes<T>) -> [Lanes<T>; N] {
    let mut out = [[T::of(0.0); LANES]; N];
    for (k, o) in out.iter_mut().enumerate() {
        *o = f(k);
    }
    out
}

/// `(e + o, e − o)` with `e = Σ ce_k a_k` and `o = Σ co_k b_k`: a pair of rows for the points `±p`,
/// which share their even and odd partial sums.
#[inline(always)]
fn pair<T: Elem>(
    a: [&Lanes<T>; 3],
    ce: [f64; 3],
    b: [&Lanes<T>; 3],
    co: [f64; 3],
) -> (Lanes<T>, Lanes<T>) {
    let (ce, co) = (
        [T::of(ce[0]), T::of(ce[1]), T::of(ce[2])],
        [T::of(co[0]), T::of(co[1]), T::of(co[2])],
    );
    let e = lanes(|l| ce[0] * a[0][l] + ce[1] * a[1][l] + ce[2] * a[2][l]);
    let o = lanes(|l| co[0] * b[0][l] + co[1] * b[1][l] + co[2] * b[2][l]);
    (lanes(|l| e[l] + o[l]), lanes(|l| e[l] - o[l]))
}

/// `Bᵀ d` for one register block, written out: the Toom–Cook matrix of [`Transforms::new`] for the
/// points `0, ±1, ±2, ±1/2, ∞` has 20 zeros, and its rows for `±p` differ only in the sign of the odd
/// columns, so each pair costs one even and one odd sum (32 multiplications instead of 64).
/// `fast_transforms_match_the_matrices` checks it against the matrix.
#[inline(always)]
fn bt_block<T: Elem>(d: &[Lanes<T>; ALPHA]) -> [Lanes<T>; ALPHA] {
    let c = T::of(21.0 / 4.0);
    let even = [&d[2], &d[4], &d[6]];
    let odd = [&d[1], &d[3], &d[5]];
    let (r1, r2) = pair(
        even,
        [-2.0 / 9.0, 17.0 / 18.0, -2.0 / 9.0],
        odd,
        [-2.0 / 9.0, 17.0 / 18.0, -2.0 / 9.0],
    );
    let (r3, r4) = pair(
        even,
        [1.0 / 360.0, -1.0 / 72.0, 1.0 / 90.0],
        odd,
        [1.0 / 180.0, -1.0 / 36.0, 1.0 / 45.0],
    );
    let (r5, r6) = pair(
        even,
        [128.0 / 45.0, -32.0 / 9.0, 32.0 / 45.0],
        odd,
        [64.0 / 45.0, -16.0 / 9.0, 16.0 / 45.0],
    );
    [
        lanes(|l| d[0][l] - d[6][l] + c * (d[4][l] - d[2][l])),
        r1,
        r2,
        r3,
        r4,
        r5,
        r6,
        lanes(|l| d[7][l] - d[1][l] + c * (d[3][l] - d[5][l])),
    ]
}

/// `2^i` and `2^−i` for the output polynomial's coefficients `i < α` (constants, so that the blocks below
/// multiply by literals).
const POW2: [f64; ALPHA] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const POW_HALF: [f64; ALPHA] = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125];

/// `Aᵀ M + bias` for one register block of `M` outputs per tile: output `i` is
/// `[i = 0] M_0 + Σ_p p^i (M_p + (−1)^i M_{−p}) + [i = M − 1] M_∞` over `p = 1, 2, 1/2`.
#[inline(always)]
fn at_block<T: Elem, const M: usize>(
    mm: &[Lanes<T>; ALPHA],
    bias: T,
    ph: &mut [T],
    ntp: usize,
    tb: usize,
) {
    let zero = T::of(0.0);
    let (mut sums, mut diffs) = ([[zero; LANES]; 3], [[zero; LANES]; 3]);
    for k in 0..3 {
        for l in 0..LANES {
            sums[k][l] = mm[2 * k + 1][l] + mm[2 * k + 2][l];
            diffs[k][l] = mm[2 * k + 1][l] - mm[2 * k + 2][l];
        }
    }
    for i in 0..M {
        let (w2, wh) = (T::of(POW2[i]), T::of(POW_HALF[i]));
        let s = if i % 2 == 0 { &sums } else { &diffs };
        let mut y = [zero; LANES];
        for l in 0..LANES {
            y[l] = bias + s[0][l] + w2 * s[1][l] + wh * s[2][l];
        }
        if i == 0 {
            for l in 0..LANES {
                y[l] += mm[0][l];
            }
        }
        if i == M - 1 {
            for l in 0..LANES {
                y[l] += mm[ALPHA - 1][l];
            }
        }
        ph[i * ntp + tb..][..LANES].copy_from_slice(&y);
    }
}

/// `A g` for one register block of `M` output-gradient values per tile: point `±p` gets
/// `Σ_i (±p)^i g_i`, from the even and odd sums; `0` gets `g_0` and `∞` gets `g_{M−1}`.
#[inline(always)]
fn a_block<T: Elem, const M: usize>(g: &[Lanes<T>; M], p: &mut [T], stride: usize, tb: usize) {
    let zero = T::of(0.0);
    let (mut e, mut o) = ([[zero; LANES]; 3], [[zero; LANES]; 3]);
    for i in 0..M {
        let w = [T::of(1.0), T::of(POW2[i]), T::of(POW_HALF[i])];
        let acc = if i % 2 == 0 { &mut e } else { &mut o };
        for k in 0..3 {
            for l in 0..LANES {
                acc[k][l] += w[k] * g[i][l];
            }
        }
    }
    p[tb..][..LANES].copy_from_slice(&g[0]);
    for k in 0..3 {
        let (mut plus, mut minus) = ([zero; LANES], [zero; LANES]);
        for l in 0..LANES {
            plus[l] = e[k][l] + o[k][l];
            minus[l] = e[k][l] - o[k][l];
        }
        p[(2 * k + 1) * stride + tb..][..LANES].copy_from_slice(&plus);
        p[(2 * k + 2) * stride + tb..][..LANES].copy_from_slice(&minus);
    }
    p[(ALPHA - 1) * stride + tb..][..LANES].copy_from_slice(&g[M - 1]);
}

/// Per-worker scratch of the tile transforms: a row segment padded with zeros where it leaves the row,
/// and its values by phase.
struct TileScratch<T> {
    seg: Vec<T>,
    phases: Vec<T>,
}

impl<T> Default for TileScratch<T> {
    fn default() -> Self {
        Self {
            seg: Vec::new(),
            phases: Vec::new(),
        }
    }
}

/// `phases[j * np + t] = seg[t M + j]` for `t < np`: the tiles' `j`-th values side by side, so that a
/// register block reads each with one vector load instead of eight scalar ones (the tile size is a
/// constant, so the compiler turns the `M` streams into vector shuffles).
#[inline(always)]
fn deinterleave<'a, T: Elem, const M: usize>(
    seg: &[T],
    np: usize,
    phases: &'a mut Vec<T>,
) -> &'a [T] {
    if phases.len() < M * np {
        phases.resize(M * np, T::of(0.0));
    }
    let phases = &mut phases[..M * np];
    let mut it = phases.chunks_exact_mut(np);
    let mut rows: [&mut [T]; M] = std::array::from_fn(|_| it.next().unwrap_or_default());
    for (t, tile) in seg[..np * M].chunks_exact(M).enumerate() {
        for (r, &v) in rows.iter_mut().zip(tile) {
            r[t] = v;
        }
    }
    phases
}

/// Eight lanes of `s` from `at`.
#[inline(always)]
fn load<T: Elem>(s: &[T], at: usize) -> Lanes<T> {
    let mut out = [T::of(0.0); LANES];
    out.copy_from_slice(&s[at..at + LANES]);
    out
}

/// [`input_transform_reference`] with `M` outputs per tile: tile `τ`'s value `q` is phase `q mod M` at
/// `τ + q div M`, so each register block is eight vector loads and [`bt_block`].
#[inline(always)]
fn input_transform_m<T: Elem, const M: usize>(
    row: &[T],
    base: isize,
    nt: usize,
    scratch: &mut TileScratch<T>,
    v: &mut [T],
    stride: usize,
) {
    let ntp = padded_tiles(nt);
    let np = ntp + (ALPHA - 1) / M + 1;
    let seg = padded_segment(row, base, np * M, &mut scratch.seg);
    let ph = deinterleave::<T, M>(seg, np, &mut scratch.phases);
    for tb in (0..ntp).step_by(LANES) {
        let d = blocks(|q| load(ph, (q % M) * np + tb + q / M));
        for (xi, out) in bt_block(&d).iter().enumerate() {
            v[xi * stride + tb..][..LANES].copy_from_slice(out);
        }
    }
}

/// [`gradient_transform_reference`] with `M` outputs per tile: tile `τ`'s value `i` is phase `i` at `τ`.
#[inline(always)]
fn gradient_transform_m<T: Elem, const M: usize>(
    row: &[T],
    start: usize,
    nt: usize,
    scratch: &mut TileScratch<T>,
    p: &mut [T],
    stride: usize,
) {
    let ntp = padded_tiles(nt);
    let seg = padded_segment(row, start as isize, ntp * M, &mut scratch.seg);
    let ph = deinterleave::<T, M>(seg, ntp, &mut scratch.phases);
    for tb in (0..ntp).step_by(LANES) {
        let g = blocks::<T, M>(|i| load(ph, i * ntp + tb));
        a_block::<T, M>(&g, p, stride, tb);
    }
}

/// The tile outputs `Aᵀ M + bias` by phase, `ph[i * ntp + τ]`, from the products `prod[ξ * stride + τ]`.
#[inline(always)]
fn output_phases_m<T: Elem, const M: usize>(
    prod: &[T],
    stride: usize,
    nt: usize,
    bias: T,
    ph: &mut [T],
) {
    let ntp = padded_tiles(nt);
    for tb in (0..nt).step_by(LANES) {
        let mm = blocks(|xi| load(prod, xi * stride + tb));
        at_block::<T, M>(&mm, bias, ph, ntp, tb);
    }
}

/// `Bᵀ d` for the tiles of one channel row, by the written-out transform for the tile sizes the layers
/// use and by the matrix otherwise.
#[inline(always)]
fn input_transform<T: Elem>(
    c: &Coeffs<T>,
    row: &[T],
    base: isize,
    nt: usize,
    scratch: &mut TileScratch<T>,
    v: &mut [T],
    stride: usize,
) {
    match c.m {
        4 => input_transform_m::<T, 4>(row, base, nt, scratch, v, stride),
        6 => input_transform_m::<T, 6>(row, base, nt, scratch, v, stride),
        _ => input_transform_reference(c, row, base, nt, &mut scratch.seg, v, stride),
    }
}

/// `A dy` for the tiles of one output-gradient row, as [`input_transform`] picks.
#[inline(always)]
fn gradient_transform<T: Elem>(
    c: &Coeffs<T>,
    row: &[T],
    start: usize,
    nt: usize,
    scratch: &mut TileScratch<T>,
    p: &mut [T],
    stride: usize,
) {
    match c.m {
        4 => gradient_transform_m::<T, 4>(row, start, nt, scratch, p, stride),
        6 => gradient_transform_m::<T, 6>(row, start, nt, scratch, p, stride),
        _ => gradient_transform_reference(c, row, start, nt, &mut scratch.seg, p, stride),
    }
}

/// `Bᵀ d` for the tiles of one channel row: tile `τ` reads `row[base + τ m ..][..α]` (zero outside the
/// row); writes `v[ξ * stride + τ]` for `τ < nt` rounded up to [`LANES`]. The matrix form, for any tile
/// size: the twin [`input_transform_m`] is tested against.
#[inline(always)]
fn input_transform_reference<T: Elem>(
    c: &Coeffs<T>,
    row: &[T],
    base: isize,
    nt: usize,
    seg: &mut Vec<T>,
    v: &mut [T],
    stride: usize,
) {
    let (m, ntp) = (c.m, padded_tiles(nt));
    let seg = padded_segment(row, base, ntp * m + ALPHA, seg);
    for tb in (0..ntp).step_by(LANES) {
        let mut d = [[T::of(0.0); LANES]; ALPHA];
        for l in 0..LANES {
            let window = &seg[(tb + l) * m..][..ALPHA];
            for (dq, &v) in d.iter_mut().zip(window) {
                dq[l] = v;
            }
        }
        for xi in 0..ALPHA {
            let acc = combine(&d, ALPHA, &c.bt[xi * ALPHA..], 1, T::of(0.0));
            v[xi * stride + tb..][..LANES].copy_from_slice(&acc);
        }
    }
}

/// `A dy` for the tiles of one output-gradient row from position `start` (zero past the row's end):
/// `p[ξ * stride + τ] = Σ_i Aᵀ[i][ξ] row[start + τ m + i]`. The matrix form, the twin of
/// [`gradient_transform_m`].
#[inline(always)]
fn gradient_transform_reference<T: Elem>(
    c: &Coeffs<T>,
    row: &[T],
    start: usize,
    nt: usize,
    seg: &mut Vec<T>,
    p: &mut [T],
    stride: usize,
) {
    let (m, ntp) = (c.m, padded_tiles(nt));
    let seg = padded_segment(row, start as isize, ntp * m, seg);
    for tb in (0..ntp).step_by(LANES) {
        let mut g = [[T::of(0.0); LANES]; MAX_M];
        for (l, tile) in seg[tb * m..(tb + LANES) * m].chunks_exact(m).enumerate() {
            for (gi, &v) in g.iter_mut().zip(tile) {
                gi[l] = v;
            }
        }
        for xi in 0..ALPHA {
            let acc = combine(&g, m, &c.at[xi..], ALPHA, T::of(0.0));
            p[xi * stride + tb..][..LANES].copy_from_slice(&acc);
        }
    }
}

/// The tile outputs by phase from the matrix `Aᵀ`, for any tile size: the twin of [`output_phases_m`].
#[inline(always)]
fn output_phases_reference<T: Elem>(
    c: &Coeffs<T>,
    prod: &[T],
    stride: usize,
    nt: usize,
    bias: T,
    ph: &mut [T],
) {
    let ntp = padded_tiles(nt);
    for tb in (0..nt).step_by(LANES) {
        let mut mm = [[T::of(0.0); LANES]; ALPHA];
        for (xi, mx) in mm.iter_mut().enumerate() {
            mx.copy_from_slice(&prod[xi * stride + tb..][..LANES]);
        }
        for i in 0..c.m {
            let o = combine(&mm, ALPHA, &c.at[i * ALPHA..], 1, bias);
            ph[i * ntp + tb..][..LANES].copy_from_slice(&o);
        }
    }
}

/// `Aᵀ M + bias` for one output channel, written to its row `y` at tiles `τ0 ..`: `prod[ξ * stride + τ]`
/// holds `M_ξ` for the channel. The tile outputs go to `ph` by phase (`ph[i * ntp + τ]`, whole vectors),
/// then into `y` in position order by one interleaving pass.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform<T: Elem>(
    c: &Coeffs<T>,
    prod: &[T],
    stride: usize,
    nt: usize,
    bias: T,
    y: &mut [std::mem::MaybeUninit<T>],
    t0: usize,
    ph: &mut [T],
) {
    let (m, ntp) = (c.m, padded_tiles(nt));
    match m {
        4 => output_phases_m::<T, 4>(prod, stride, nt, bias, ph),
        6 => output_phases_m::<T, 6>(prod, stride, nt, bias, ph),
        _ => output_phases_reference(c, prod, stride, nt, bias, ph),
    }
    let n_pos = (nt * m).min(y.len() - t0);
    let whole = n_pos / m * m;
    let y = &mut y[t0..t0 + n_pos];
    match m {
        4 => interleave::<T, 4>(ph, ntp, &mut y[..whole]),
        6 => interleave::<T, 6>(ph, ntp, &mut y[..whole]),
        _ => {
            for (k, yv) in y[..whole].iter_mut().enumerate() {
                yv.write(ph[(k % m) * ntp + k / m]);
            }
        }
    }
    for (k, yv) in y.iter_mut().enumerate().skip(whole) {
        yv.write(ph[(k % m) * ntp + k / m]);
    }
}

/// `y[τ M + i] = ph[i * ntp + τ]` for the whole tiles of `y` (the tile size is a constant here, so that
/// the compiler turns the `M` streams into vector shuffles).
#[inline(always)]
fn interleave<T: Elem, const M: usize>(ph: &[T], ntp: usize, y: &mut [std::mem::MaybeUninit<T>]) {
    let n = y.len() / M;
    let mut rows: [&[T]; M] = [&[]; M];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = &ph[i * ntp..i * ntp + n];
    }
    for (tau, tile) in y.chunks_exact_mut(M).enumerate() {
        for (yv, r) in tile.iter_mut().zip(rows.iter()) {
            yv.write(r[tau]);
        }
    }
}

/// Scratch of one rayon worker: the tile transforms' scratch, the transformed input `V (α, c_in, CHUNK)`,
/// the products `M (α, c_out, CHUNK)` and one output row's phases (`m × CHUNK`).
type Scratch<T> = (TileScratch<T>, Vec<T>, Vec<T>, Vec<T>);

simd_fn! {
/// The correlation of `geo` by transformed filter `u`, plus `bias` per output channel.
fn correlate<T: Elem>(tf: &Transforms, x: &[T], u: &[T], bias: Option<&[T]>, geo: Geometry) -> Vec<T> {
    let c = Coeffs::<T>::new(tf);
    let (m, zero) = (tf.m, T::of(0.0));
    let n_tiles = geo.l_out.div_ceil(m);
    let chunk = padded_tiles(n_tiles).min(CHUNK);
    let par = inner_parallelism(geo.b);
    par_rows_uninit(
        geo.b,
        geo.c_out * geo.l_out,
        Scratch::<T>::default,
        |(seg, v, prod, ph), i, yi| {
            {
                let item = &x[i * geo.c_in * geo.l_in..(i + 1) * geo.c_in * geo.l_in];
                v.resize(ALPHA * geo.c_in * chunk, zero);
                prod.resize(ALPHA * geo.c_out * chunk, zero);
                ph.resize(m * chunk, zero);
                for tau0 in (0..n_tiles).step_by(chunk) {
                    let nt = chunk.min(n_tiles - tau0);
                    let base = (tau0 * m) as isize - geo.pad as isize;
                    for ci in 0..geo.c_in {
                        let row = &item[ci * geo.l_in..(ci + 1) * geo.l_in];
                        let vs = &mut v[ci * chunk..];
                        input_transform(&c, row, base, nt, seg, vs, geo.c_in * chunk);
                    }
                    for pt in 0..ALPHA {
                        // SAFETY: dst is M_ξ (c_out × nt, row stride chunk) inside `prod`; lhs is U_ξ,
                        // (c_out, c_in) row-major inside `u`; rhs is V_ξ (c_in × nt, row stride chunk)
                        // inside `v`.
                        unsafe {
                            gemm_into(
                                (geo.c_out, nt, geo.c_in),
                                prod.as_mut_ptr().add(pt * geo.c_out * chunk),
                                chunk,
                                View::row_major(u.as_ptr().add(pt * geo.c_out * geo.c_in), geo.c_in),
                                View::row_major(v.as_ptr().add(pt * geo.c_in * chunk), chunk),
                                false,
                                par,
                            )
                        }
                    }
                    for co in 0..geo.c_out {
                        let b = bias.map_or(zero, |bs| bs[co]);
                        let yrow = &mut yi[co * geo.l_out..(co + 1) * geo.l_out];
                        let ps = &prod[co * chunk..];
                        output_transform(&c, ps, geo.c_out * chunk, nt, b, yrow, tau0 * m, ph);
                    }
                }
            }
        },
    )
}
}

/// Forward: `y = bias + Σ_j W_j x[:, j..]`, `(b, c_out, l − k + 1)`.
pub(crate) fn conv_fwd<T: Elem>(tf: &Transforms, x: &[T], w: &[T], bias: &[T], d: Dims) -> Vec<T> {
    let u = filter_transform(tf, w, d.c_out, d.c_in);
    let geo = Geometry {
        b: d.b,
        c_in: d.c_in,
        c_out: d.c_out,
        l_in: d.l,
        pad: 0,
        l_out: d.l_out(),
    };
    correlate(tf, x, &u, Some(bias), geo)
}

/// Input gradient: `dx[:, s] = Σ_j W_jᵀ dy[:, s − j]`, the valid correlation of `dy` padded with `k − 1`
/// zeros on both sides and the filter flipped and transposed, `(b, c_in, l)`.
pub(crate) fn conv_bwd_input<T: Elem>(tf: &Transforms, w: &[T], gy: &[T], d: Dims) -> Vec<T> {
    let r = d.k;
    let mut flipped = vec![T::of(0.0); w.len()];
    for co in 0..d.c_out {
        for ci in 0..d.c_in {
            for j in 0..r {
                flipped[(ci * d.c_out + co) * r + r - 1 - j] = w[(co * d.c_in + ci) * r + j];
            }
        }
    }
    let u = filter_transform(tf, &flipped, d.c_in, d.c_out);
    let geo = Geometry {
        b: d.b,
        c_in: d.c_out,
        c_out: d.c_in,
        l_in: d.l_out(),
        pad: r - 1,
        l_out: d.l,
    };
    correlate(tf, gy, &u, None, geo)
}

simd_fn! {
/// Weight and bias gradients: `S_ξ = Σ_tiles (A dy)_ξ (Bᵀ x)_ξᵀ` per point, then `dW = Gᵀ S`; one
/// accumulator per rayon task, as the direct kernel has.
pub(crate) fn conv_bwd_weight<T: Elem>(
    tf: &Transforms,
    x: &[T],
    gy: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>) {
    let (m, l_out, zero) = (tf.m, d.l_out(), T::of(0.0));
    let n_tiles = l_out.div_ceil(m);
    let chunk = padded_tiles(n_tiles).min(CHUNK);
    let n_tasks = rayon::current_num_threads().clamp(1, d.b.max(1));
    let per_task = d.b.div_ceil(n_tasks);
    let par = inner_parallelism(n_tasks);
    let s_len = ALPHA * d.c_out * d.c_in;
    let c = Coeffs::<T>::new(tf);
    let (s, db) = (0..n_tasks)
        .into_par_iter()
        .map(|task| {
            let mut s = vec![zero; s_len];
            let mut db = vec![0f64; d.c_out];
            let mut seg = TileScratch::default();
            let mut v = vec![zero; ALPHA * d.c_in * chunk];
            let mut p = vec![zero; ALPHA * d.c_out * chunk];
            for i in task * per_task..((task + 1) * per_task).min(d.b) {
                let item = &x[i * d.c_in * d.l..(i + 1) * d.c_in * d.l];
                let gyi = &gy[i * d.c_out * l_out..(i + 1) * d.c_out * l_out];
                for tau0 in (0..n_tiles).step_by(chunk) {
                    let nt = chunk.min(n_tiles - tau0);
                    let base = (tau0 * m) as isize;
                    for ci in 0..d.c_in {
                        let row = &item[ci * d.l..(ci + 1) * d.l];
                        let vs = &mut v[ci * chunk..];
                        input_transform(&c, row, base, nt, &mut seg, vs, d.c_in * chunk);
                    }
                    for co in 0..d.c_out {
                        let row = &gyi[co * l_out..(co + 1) * l_out];
                        let ps = &mut p[co * chunk..];
                        gradient_transform(&c, row, tau0 * m, nt, &mut seg, ps, d.c_out * chunk);
                    }
                    for pt in 0..ALPHA {
                        // SAFETY: dst is S_ξ (c_out, c_in) row-major inside `s`, owned by this task; lhs is
                        // P_ξ (c_out × nt, row stride chunk) inside `p`; rhs element (τ, ci) is
                        // V_ξ[ci][τ] = v[(ξ c_in + ci) chunk + τ], in bounds for τ < nt.
                        unsafe {
                            gemm_into(
                                (d.c_out, d.c_in, nt),
                                s.as_mut_ptr().add(pt * d.c_out * d.c_in),
                                d.c_in,
                                View::row_major(p.as_ptr().add(pt * d.c_out * chunk), chunk),
                                View {
                                    ptr: v.as_ptr().add(pt * d.c_in * chunk),
                                    rs: 1,
                                    cs: chunk,
                                },
                                true,
                                par,
                            )
                        }
                    }
                }
                for (acc, row) in db.iter_mut().zip(gyi.chunks(l_out)) {
                    *acc += lane_sums(row.len(), |t| (row[t], zero)).0;
                }
            }
            (s.iter().map(|v| v.to64()).collect::<Vec<f64>>(), db)
        })
        .reduce(
            || (vec![0f64; s_len], vec![0f64; d.c_out]),
            |(mut s_a, mut db_a), (s_b, db_b)| {
                s_a.iter_mut().zip(s_b).for_each(|(a, b)| *a += b);
                db_a.iter_mut().zip(db_b).for_each(|(a, b)| *a += b);
                (s_a, db_a)
            },
        );
    let r = d.k;
    let mut dw = vec![zero; d.c_out * d.c_in * r];
    for co in 0..d.c_out {
        for ci in 0..d.c_in {
            for j in 0..r {
                let v: f64 = (0..ALPHA)
                    .map(|xi| tf.g[xi * r + j] * s[(xi * d.c_out + co) * d.c_in + ci])
                    .sum();
                dw[(co * d.c_in + ci) * r + j] = T::of(v);
            }
        }
    }
    (dw, db.into_iter().map(T::of).collect())
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in (−1, 1) (a 64-bit LCG; no RNG crate needed for a transform check).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The written-out transforms of the tile sizes the layers use (`F(4, 5)`, `F(6, 3)`) against the
    /// Toom–Cook matrices, on rows whose tiles start before the row, inside it and past its end, with
    /// tile counts that are not whole register blocks.
    #[test]
    fn fast_transforms_match_the_matrices() {
        for r in [5, 3] {
            let tf = Transforms::new(r).unwrap();
            let c = Coeffs::<f64>::new(&tf);
            let row = values(301, r as u64);
            for (base, nt) in [(-4isize, 13usize), (0, 8), (37, 29), (250, 17), (290, 5)] {
                let stride = padded_tiles(nt);
                let (mut fast, mut want) = (vec![0.0; ALPHA * stride], vec![0.0; ALPHA * stride]);
                let mut scratch = TileScratch::default();
                input_transform(&c, &row, base, nt, &mut scratch, &mut fast, stride);
                input_transform_reference(&c, &row, base, nt, &mut Vec::new(), &mut want, stride);
                let err = max_diff(&fast, &want);
                assert!(err < 1e-12, "Bᵀ d, r = {r}, base {base}: {err:e}");

                let start = base.max(0) as usize;
                gradient_transform(&c, &row, start, nt, &mut scratch, &mut fast, stride);
                gradient_transform_reference(
                    &c,
                    &row,
                    start,
                    nt,
                    &mut Vec::new(),
                    &mut want,
                    stride,
                );
                let err = max_diff(&fast, &want);
                assert!(err < 1e-12, "A g, r = {r}, start {start}: {err:e}");

                let prod = values(ALPHA * stride, 7 + nt as u64);
                let (mut fast, mut want) = (vec![0.0; tf.m * stride], vec![0.0; tf.m * stride]);
                match tf.m {
                    4 => output_phases_m::<f64, 4>(&prod, stride, nt, 0.25, &mut fast),
                    _ => output_phases_m::<f64, 6>(&prod, stride, nt, 0.25, &mut fast),
                }
                output_phases_reference(&c, &prod, stride, nt, 0.25, &mut want);
                let err = max_diff(&fast, &want);
                assert!(err < 1e-12, "Aᵀ M, r = {r}: {err:e}");
            }
        }
    }
}
