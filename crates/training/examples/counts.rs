//! The bodies that `cargo xtask bench-check` counts under Valgrind (issue 13).
//!
//! `counts FIGURE UNITS` builds the figure's inputs, then runs UNITS units of its work: one training
//! step, one eval forward, one log-prob forward+backward, one posterior draw, one batch read from a
//! memory-mapped npy file, or one synthetic star. The xtask runs it twice under Callgrind, with 1 and
//! with 3 units, and takes half the difference of the two instruction totals as the cost of one unit:
//! set-up, first-call initialisation and process start-up cancel, so no client request or symbol
//! filter is needed and every thread's instructions count.
//!
//! Everything runs on the calling thread (a one-thread rayon pool that uses it, and
//! `RAYON_NUM_THREADS=1` for candle's gemm), so the count does not depend on how threads were
//! scheduled. The global allocator counts allocations and live bytes; after the last unit the binary
//! prints one JSON line with that unit's allocations and its peak heap above the heap it started
//! with, which the gate compares too.
//!
//! `counts --list` prints the figure names, one per line. `counts --cache-info` prints the cache
//! description gemm sizes its blocks from, as one JSON line; the gate records it beside the figures.
//!
//! gemm reads that description from the host's `/sys/devices/system/cpu`, which Valgrind does not
//! hide, so this binary does (see [`opendir`]): every host then counts the blocking of gemm's built-in
//! cache sizes. `counts --see-host-cache ...` leaves the host's files visible; the gate's self-test
//! uses it to show that the pin is what keeps the hosts' caches out of the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{CStr, CString};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use starflow_data::{Batcher, Dataset, FluxTransform, LabelScaler, LoadOptions, SynthConfig};
use starflow_flows::Flow;
use starflow_training::optim::Adam;
use starflow_training::{StarModel, TrainConfig};

/// Counts allocations and tracks live and peak heap bytes; the work itself goes to the system allocator.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// counters are plain atomics and never affect what is returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCS.fetch_add(1, Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCS.fetch_add(1, Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCS.fetch_add(1, Relaxed);
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// glibc's `getrandom`, replaced in this binary by a fixed byte sequence. The standard library seeds
/// every `HashMap` (candle's gradient store and variable map among them) from it; with a fresh seed
/// per process the probe lengths, and now and then a rehash, changed the counts from run to run (up to
/// 0.25 % of a training step's instructions and one allocation in seven runs). Nothing here needs
/// unpredictable numbers: every random draw of the figures comes from seeded ChaCha generators.
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes, as glibc's contract requires of its callers.
#[no_mangle]
pub unsafe extern "C" fn getrandom(buf: *mut u8, len: usize, _flags: u32) -> isize {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Relaxed);
    for i in 0..len {
        // SAFETY: i < len, and the caller guarantees `buf` holds `len` bytes.
        unsafe { *buf.add(i) = (i.wrapping_mul(131) ^ call.wrapping_mul(7919)) as u8 };
    }
    len as isize
}

/// Whether [`opendir`] lets the host's cache description through (`--see-host-cache` only).
static SEE_HOST_CACHE: AtomicBool = AtomicBool::new(false);

/// Where Linux describes the CPU caches (`cpuN/cache/indexM/{level,size,ways_of_associativity,..}`).
const CPU_SYSFS: &[u8] = b"/sys/devices/system/cpu";

/// An empty directory of this process, which [`opendir`] opens in place of [`CPU_SYSFS`].
static NO_CACHES: OnceLock<(tempfile::TempDir, CString)> = OnceLock::new();

/// glibc's `opendir`, wrapped so that this binary cannot read the host's cache description.
///
/// gemm sizes its blocks, and with them its packing buffers and loop trip counts, from the first of:
/// the files under `/sys/devices/system/cpu/*/cache`, `lscpu` (which reads the same files), CPUID;
/// cache levels it finds no size for take its built-in defaults. Measured (issue 28): an Intel Xeon
/// with 2 MB of L2 per core counted eval_forward/tiny_cnn's peak heap +262,144 B (+4.0 %, one packing
/// buffer) and train_step/tiny_cnn −0.07 % instructions against an AMD EPYC with 512 KB, from that
/// alone. Here that directory opens as an empty one: gemm's reading succeeds with no sizes, so it
/// neither spawns `lscpu` nor asks CPUID, and every level takes gemm's defaults (x86: 32 KiB L1,
/// 256 KiB L2, 2 MiB L3, 8-way), the same on every host. Pinning the description, rather than leaving
/// the heap figures out, keeps the gate watching gemm's buffers.
///
/// # Safety
/// `name` must be a valid NUL-terminated string, as glibc's contract requires of its callers.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub unsafe extern "C" fn opendir(name: *const libc::c_char) -> *mut libc::DIR {
    type OpenDir = unsafe extern "C" fn(*const libc::c_char) -> *mut libc::DIR;
    // SAFETY: RTLD_NEXT finds glibc's own `opendir`, whose signature `OpenDir` is.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"opendir".as_ptr()) };
    if real.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `real` is glibc's `opendir` (checked non-null above).
    let real = unsafe { std::mem::transmute::<*mut libc::c_void, OpenDir>(real) };
    // SAFETY: the caller passes a valid C string.
    let path = unsafe { CStr::from_ptr(name) }.to_bytes();
    match NO_CACHES.get() {
        Some((_, empty)) if path == CPU_SYSFS && !SEE_HOST_CACHE.load(Relaxed) => {
            // SAFETY: `empty` is a valid C string naming this process's empty directory.
            unsafe { real(empty.as_ptr()) }
        }
        // SAFETY: the caller's argument, unchanged.
        _ => unsafe { real(name) },
    }
}

/// Creates the empty directory [`opendir`] shows gemm, before anything can call gemm.
fn hide_host_caches() -> Result<()> {
    let dir = tempfile::tempdir().context("creating an empty directory for gemm")?;
    let path = CString::new(dir.path().as_os_str().as_encoded_bytes())
        .context("the temporary directory's path holds a NUL byte")?;
    NO_CACHES
        .set((dir, path))
        .map_err(|_| anyhow::anyhow!("hide_host_caches ran twice"))
}

/// The cache description gemm sizes its blocks from, as one JSON line.
fn print_cache_info() {
    let levels: Vec<String> = gemm_common::cache::CACHE_INFO
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{{\"level\":{},\"bytes\":{},\"ways\":{},\"line\":{}}}",
                i + 1,
                c.cache_bytes,
                c.associativity,
                c.cache_line_bytes
            )
        })
        .collect();
    println!("{{\"gemm_cache\":[{}]}}", levels.join(","));
}

/// Backbone figures: batch and spectrum length small enough that a unit stays near a second under
/// Callgrind, large enough that every layer of both backbones does real work.
const BACKBONE_BATCH: usize = 4;
const BACKBONE_LEN: usize = 2048;
/// Flow figures: the batch of the criterion benchmarks.
const FLOW_BATCH: usize = 64;
/// Posterior sampling: draws per star and stars.
const SAMPLES: usize = 1000;
const SAMPLE_STARS: usize = 8;
/// npy reader: rows per batch read, of the full GALAH length.
const READ_ROWS: usize = 64;
const READ_LEN: usize = 16384;

/// Every figure, in the order the gate prints them.
const FIGURES: [&str; 11] = [
    "train_step/cnn",
    "train_step/tiny_cnn",
    "eval_forward/cnn",
    "eval_forward/tiny_cnn",
    "log_prob_fwd_bwd/diagonal_gaussian",
    "log_prob_fwd_bwd/full_gaussian",
    "log_prob_fwd_bwd/full_flow",
    "sample/full_flow",
    "sample/full_gaussian",
    "npy_read/batch64",
    "synth/star",
];

fn main() -> Result<()> {
    hide_host_caches()?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--see-host-cache") {
        SEE_HOST_CACHE.store(true, Relaxed);
        args.remove(0);
    }
    match args.first().map(String::as_str) {
        Some("--list") => {
            FIGURES.iter().for_each(|f| println!("{f}"));
            return Ok(());
        }
        Some("--cache-info") => {
            print_cache_info();
            return Ok(());
        }
        _ => {}
    }
    let [figure, units] = args.as_slice() else {
        bail!("usage: counts [--see-host-cache] (FIGURE UNITS | --list | --cache-info)");
    };
    let units: usize = units.parse().context("UNITS must be a positive integer")?;
    if units == 0 {
        bail!("UNITS must be at least 1");
    }
    one_thread()?;
    let mut work = setup(figure)?;
    for unit in 0..units {
        let last = unit + 1 == units;
        if last {
            PEAK.store(LIVE.load(Relaxed), Relaxed);
            ALLOCS.store(0, Relaxed);
        }
        let base = LIVE.load(Relaxed);
        work.unit(last, units)?;
        if last {
            println!(
                "{{\"figure\":\"{figure}\",\"units\":{units},\"allocs\":{},\"heap_peak_bytes\":{}}}",
                ALLOCS.load(Relaxed),
                PEAK.load(Relaxed).saturating_sub(base)
            );
        }
    }
    Ok(())
}

/// One rayon worker, the calling thread itself, and one gemm thread: nothing runs elsewhere.
fn one_thread() -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build_global()
        .context("building the one-thread rayon pool")
}

/// A figure's prepared inputs.
enum Work {
    Train(Box<StarModel>, Adam, Tensor, Tensor),
    Eval(Box<StarModel>, Tensor),
    LogProb(Flow, Var, Tensor),
    Sample(Flow, Tensor),
    /// The directory lives as long as the dataset that maps its file.
    Read {
        ds: Dataset,
        scaler: LabelScaler,
        _dir: tempfile::TempDir,
    },
    /// One unit is one star: the last call generates all `units` stars (at the GALAH size) in one
    /// `generate`, the others do nothing, so the gate's difference of two runs leaves one star's cost
    /// and the reported heap is that of the whole call.
    Synth,
}

impl Work {
    fn unit(&mut self, last: bool, units: usize) -> Result<()> {
        match self {
            Work::Train(model, adam, x, y) => {
                let loss = model.nll(x, y, true)?.mean_all()?;
                adam.step(&loss.backward()?, 1e-4)?;
            }
            Work::Eval(model, x) => {
                black_box(model.params(x, false)?.to_vec2::<f64>()?);
            }
            Work::LogProb(flow, params, x) => {
                let lp = flow.log_prob(params.as_tensor(), x)?;
                black_box(lp.sum_all()?.backward()?);
            }
            Work::Sample(flow, params) => {
                black_box(flow.sample_seeded(params, SAMPLES, 7)?);
            }
            Work::Read { ds, scaler, .. } => {
                let batcher = Batcher {
                    dataset: ds,
                    flux: FluxTransform::new(0.2)?,
                    scaler,
                    device: Device::Cpu,
                };
                let rows: Vec<usize> = (0..READ_ROWS).collect();
                black_box(batcher.batch(&rows)?);
            }
            Work::Synth if last => {
                let cfg = SynthConfig {
                    n: units,
                    seed: 3,
                    ..SynthConfig::default()
                };
                black_box(starflow_data::generate(&cfg, &|_| {})?);
            }
            Work::Synth => {}
        }
        Ok(())
    }
}

fn setup(figure: &str) -> Result<Work> {
    let Some((kind, name)) = figure.split_once('/') else {
        bail!("unknown figure `{figure}` (counts --list names them)");
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    Ok(match kind {
        "train_step" | "eval_forward" => {
            let mut cfg = TrainConfig::default();
            cfg.model.backbone = name.into();
            let model = StarModel::new(&cfg, BACKBONE_LEN, 3, &Device::Cpu)?;
            let x = randn_f32(&mut rng, &[BACKBONE_BATCH, 1, BACKBONE_LEN])?;
            if kind == "eval_forward" {
                Work::Eval(Box::new(model), x)
            } else {
                let y = randn(&mut rng, BACKBONE_BATCH, 3, 1.0)?;
                let vars = starflow_models::named_trainable_vars(&model.varmap);
                let adam = Adam::new(vars, &cfg.optim)?;
                Work::Train(Box::new(model), adam, x, y)
            }
        }
        "log_prob_fwd_bwd" => {
            let flow = starflow_flows::flow_by_name(name, 3)?;
            let params = Var::from_tensor(&randn(&mut rng, FLOW_BATCH, flow.n_params(), 0.5)?)?;
            let x = randn(&mut rng, FLOW_BATCH, 3, 1.5)?;
            Work::LogProb(flow, params, x)
        }
        "sample" => {
            let flow = starflow_flows::flow_by_name(name, 3)?;
            let params = randn(&mut rng, SAMPLE_STARS, flow.n_params(), 0.5)?;
            Work::Sample(flow, params)
        }
        "npy_read" => npy_read_setup()?,
        "synth" if name == "star" => Work::Synth,
        _ => bail!("unknown figure `{figure}` (counts --list names them)"),
    })
}

/// A `READ_ROWS x READ_LEN` f32 spectra file and its labels in a temporary directory, opened the way
/// training opens data.
fn npy_read_setup() -> Result<Work> {
    let dir = tempfile::tempdir()?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let spectra: Vec<f32> = (0..READ_ROWS * READ_LEN)
        .map(|_| 1.0 - 0.3 * rng.random::<f32>())
        .collect();
    let labels: Vec<f64> = (0..READ_ROWS * 8).map(|_| rng.random::<f64>()).collect();
    starflow_data::npy::write_npy(
        dir.path().join("spectra.npy"),
        &[READ_ROWS, READ_LEN],
        &spectra,
    )?;
    starflow_data::npy::write_npy(dir.path().join("labels.npy"), &[READ_ROWS, 8], &labels)?;
    let ds = Dataset::load_dir(dir.path(), &LoadOptions::default())?;
    let all: Vec<usize> = (0..READ_ROWS).collect();
    let scaler = LabelScaler::fit(&ds, &all)?;
    Ok(Work::Read {
        ds,
        scaler,
        _dir: dir,
    })
}

fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize, std: f64) -> Result<Tensor> {
    let v: Vec<f64> = (0..rows * cols)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

fn randn_f32(rng: &mut ChaCha8Rng, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F32)?)
}
