//! A small process-wide pool of large f32 buffers for the fused kernels.
//!
//! Why: glibc serves blocks above 32 MiB with fresh `mmap`s, so without reuse each step page-faults its
//! largest activations in again (~14% of a CNNModel step's CPU time under `perf`). Each fused block's saved
//! pre-activation goes back here when its op is dropped (end of the step) and is handed out again for the
//! next large kernel allocation of a similar size (capacity `n..=2n`). Only those buffers are returned, so
//! the pool never holds more than one step's pre-activations, which the next forward takes up again (peak
//! memory unchanged; returning the backward's `dz` too was measured to raise TinyCNN's peak from 1.4 to
//! 1.8 GB). Only f32 is pooled (the training dtype); the pool keeps at most [`MAX_POOLED_BYTES`].

use std::any::TypeId;
use std::mem::ManuallyDrop;
use std::sync::Mutex;

/// Upper bound on the bytes kept idle in the pool.
pub const MAX_POOLED_BYTES: usize = 1 << 30;
/// Buffers smaller than this are left to the allocator.
const MIN_POOLED_ELEMS: usize = 1 << 18;

static F32_POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

fn cast_vec<A: 'static, B: 'static>(v: Vec<A>) -> Option<Vec<B>> {
    if TypeId::of::<A>() != TypeId::of::<B>() {
        return None;
    }
    let mut v = ManuallyDrop::new(v);
    // SAFETY: `A` and `B` are the same type (checked through `TypeId`), so pointer, length, capacity and
    // allocation layout are valid for `Vec<B>`; the original is not dropped.
    Some(unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut B, v.len(), v.capacity()) })
}

/// An empty vector with capacity for at least `n` elements, reused from the pool when one of capacity in
/// `n..=2n` is idle.
pub(crate) fn take<T: 'static>(n: usize) -> Vec<T> {
    if n >= MIN_POOLED_ELEMS && TypeId::of::<T>() == TypeId::of::<f32>() {
        let mut pool = F32_POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() <= 2 * n)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut v = pool.swap_remove(i);
            v.clear();
            if let Some(v) = cast_vec::<f32, T>(v) {
                return v;
            }
        }
    }
    Vec::with_capacity(n)
}

/// Returns a buffer to the pool (dropped instead when small, not f32, or the pool is full).
pub(crate) fn give<T: 'static>(v: Vec<T>) {
    if v.capacity() < MIN_POOLED_ELEMS {
        return;
    }
    let Some(v) = cast_vec::<T, f32>(v) else {
        return;
    };
    let mut pool = F32_POOL.lock().unwrap_or_else(|e| e.into_inner());
    let idle: usize = pool.iter().map(|b| b.capacity() * 4).sum();
    if idle + v.capacity() * 4 <= MAX_POOLED_BYTES {
        pool.push(v);
    }
}
