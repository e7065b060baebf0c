//! Fast CPU kernels wrapped as candle `CustomOp`s with hand-written backward passes.
//!
//! Dispatch rules: every op here runs on CPU storage in f32 or f64 (other dtypes are an error); the backbones
//! call them only on the CPU with [`crate::ComputePath::Fast`] and use candle's stock ops everywhere else.
//! Each op sits in its own file with a `*_reference` twin built from stock tensor ops:
//! - [`conv1d`]: valid (unpadded, stride 1) conv1d + bias as one `gemm` per tap on shifted views of the
//!   input, rayon over the batch; one-input-channel layers by their own kernels; k3 and k5 layers with
//!   at least 8 channels each side through [`winograd`].
//! - [`winograd`]: `F(6, 3)` and `F(4, 5)` minimal filtering for the forward and both gradients, tested
//!   against the direct kernels' plain sums.
//! - [`block`]: ReLU + BatchNorm (batch or running statistics) + Dropout + AvgPool in one pass over memory,
//!   with a fused backward that includes the gradient through the batch statistics.
//! - [`conv_block`]: a convolution and its block in one op, so that the pre-activation never enters
//!   candle's autograd (the backbones' fast path).
//! - [`dropout`]: seeded, stream-split dropout masks shared by both paths and by the tests.
//!
//! Large f32 outputs are written without zero-filling and drawn from a small pool of buffers that the fused
//! blocks return at the end of a step (see `pool.rs`), so the biggest activations are not page-faulted in
//! again every step.

pub mod block;
pub mod conv1d;
pub mod conv_block;
pub mod dropout;
pub(crate) mod pool;
pub mod trunk;
pub mod winograd;

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

thread_local! {
    /// Set inside [`inference`]: the fused ops keep nothing for a backward pass.
    static INFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as pure inference: the fused convolution blocks take their no-graph path (nothing kept
/// for a backward pass) even when their weights are trainable variables, which a loaded run's are.
///
/// Why: inference (`predict`, `evaluate`, the validation pass) never differentiates, yet a loaded
/// model's weights are `Var`s, so every block kept its pre-activation (the network's largest
/// tensors) until the forward's result was dropped: `starflow predict` with TinyCNN at 16,384 px
/// peaked at 1.61 GB instead of 0.86 GB. A block run here is outside any backward pass: its weights
/// get no gradient from it. The flag is per thread (the ops are built on the calling thread) and
/// restored when `f` returns or panics.
pub fn inference<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INFERENCE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INFERENCE.with(|c| c.replace(true)));
    f()
}

/// Whether the calling thread is inside [`inference`].
pub(crate) fn in_inference() -> bool {
    INFERENCE.with(|c| c.get())
}

/// A tensor's values as f64 on the host, from any device and float dtype. The stock path's small
/// per-channel values (BatchNorm statistics) come back this way: Metal has no f64, so the cast
/// happens after the transfer (on the CPU both steps are no-ops or the same cast as before).
pub fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1()
}

/// `values` as a tensor of `like`'s dtype and device: cast on the host, then one transfer.
pub fn f64_like(values: Vec<f64>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
}

/// Floating-point element types the kernels support (f32 and f64, accumulating statistics in f64).
pub trait Elem:
    candle_core::WithDType
    + Copy
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::Sub<Output = Self>
    + PartialOrd
{
    fn of(v: f64) -> Self;
    fn to64(self) -> f64;
    /// A keep-mask byte (0 or 1) as a number.
    fn of_u8(v: u8) -> Self;
    /// `max(self, 0)`.
    fn relu(self) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn of_u8(v: u8) -> Self {
        f32::from(v)
    }
    #[inline(always)]
    fn relu(self) -> Self {
        self.max(0.0)
    }
    #[inline(always)]
    fn to64(self) -> f64 {
        self as f64
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn of_u8(v: u8) -> Self {
        f64::from(v)
    }
    #[inline(always)]
    fn relu(self) -> Self {
        self.max(0.0)
    }
    #[inline(always)]
    fn to64(self) -> f64 {
        self
    }
}

/// The contiguous slice of a CPU storage described by `layout`, or an error naming `op`.
pub(crate) fn contiguous_slice<'a, T: Elem>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous, got layout {layout:?}"),
    }
}

/// Runs `f` on the contiguous CPU data of `t` (made contiguous first if needed).
pub(crate) fn with_cpu_slice<T: Elem, R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_slice::<T>(op, cpu, layout)?),
        _ => bail!("{op}: backward runs on the CPU only"),
    }
}

/// Builds a vector of `n_rows * row_len` elements without zeroing it first: `init(row, out)` runs in
/// parallel (rayon, `for_each_init` with `scratch`) and must write every element of its row `out`, then may
/// treat it as initialised through [`assume_init`].
pub(crate) fn par_rows_uninit<T, S, F>(
    n_rows: usize,
    row_len: usize,
    scratch: fn() -> S,
    init: F,
) -> Vec<T>
where
    T: Copy + Send + Sync + 'static,
    S: Send,
    F: Fn(&mut S, usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
{
    use rayon::prelude::*;
    let n = n_rows * row_len;
    let mut v: Vec<T> = pool::take(n);
    if row_len > 0 {
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each_init(scratch, |s, (row, out)| init(s, row, out));
    }
    // SAFETY: capacity is at least `n`, and every one of the `n` elements was written by `init` (its
    // contract: each call writes its whole row, and the rows tile `0..n`).
    unsafe { v.set_len(n) };
    v
}

/// Views a fully written row of `MaybeUninit<T>` as initialised.
///
/// # Safety
/// Every element of `row` must have been written.
pub(crate) unsafe fn assume_init<T>(row: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the caller guarantees initialisation.
    unsafe { &mut *(row as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// A raw pointer that may cross rayon's thread boundary; used only where each task writes its own element.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
// SAFETY: dereferenced only inside parallel tasks that write pairwise distinct elements of one allocation
// that outlives the parallel section (stated at each use).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl<T> Sync for SendPtr<T> {}

/// Eight-lane sums `(Σ a, Σ b)` of two derived sequences, accumulated in `T` per 512 elements and in f64
/// across blocks (independent lanes let the compiler vectorise).
#[inline(always)]
pub(crate) fn lane_sums<T: Elem>(n: usize, f: impl Fn(usize) -> (T, T)) -> (f64, f64) {
    const LANES: usize = 8;
    let zero = T::of(0.0);
    let (mut s1, mut s2) = (0f64, 0f64);
    let mut start = 0;
    while start < n {
        let end = (start + 512).min(n);
        let mut a = [zero; LANES];
        let mut b = [zero; LANES];
        let mut i = start;
        while i + LANES <= end {
            for q in 0..LANES {
                let (x, y) = f(i + q);
                a[q] += x;
                b[q] += y;
            }
            i += LANES;
        }
        for j in i..end {
            let (x, y) = f(j);
            a[0] += x;
            b[0] += y;
        }
        s1 += a.iter().map(|v| v.to64()).sum::<f64>();
        s2 += b.iter().map(|v| v.to64()).sum::<f64>();
        start = end;
    }
    (s1, s2)
}

/// Whether the CPU has AVX2 and FMA (std caches the detection, so this is two atomic loads).
///
/// Why: the crate is built for baseline x86-64 (SSE2) so that one binary runs anywhere, and `gemm` picks
/// its own kernels at run time; [`simd_fn`] gives the element-wise loops of the kernels the same
/// treatment, so they run 8 lanes wide where the CPU allows.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the CPU has AVX-512 F, VL, BW and DQ besides AVX2 and FMA (the dropout mask's hashes use
/// its 64-bit lane multiply).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    has_avx2_fma()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

/// `simd_fn! { fn name<T: Elem>(args) -> Ret { body } }` defines `name` with `body` compiled twice: in a
/// `#[target_feature(enable = "avx2,fma")]` copy, run where [`has_avx2_fma`] says so, and as built.
/// Closures written in `body` (rayon's per-row work) belong to each copy, so they inherit its features,
/// and `#[inline(always)]` helpers they call are compiled with them. Element-wise results do not change:
/// Rust never fuses a multiply and an add on its own, and the kernels' sums fix their lane order.
macro_rules! simd_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident<$t:ident: Elem>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$t: Elem>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<$t: Elem>($($arg: $ty),*) $(-> $ret)? $body
                if $crate::ops::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            fn plain<$t: Elem>($($arg: $ty),*) $(-> $ret)? $body
            plain($($arg),*)
        }
    };
}
pub(crate) use simd_fn;
