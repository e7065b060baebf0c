//! `cargo xtask cuda-build`: the `cuda` feature built on any Linux x86-64 machine, GPU or not.
//!
//! candle's `cuda` feature needs `nvcc` (to compile its kernels to PTX) and, because candle forces
//! cudarc's `dynamic-linking`, the CUDA libraries at link time. Neither needs a GPU. This command
//! makes the build reproducible from a fresh clone (what was learnt by hand is in
//! `../shared/reference/cuda_build.md`):
//!
//! 1. **Toolkit**: the pinned CUDA 13.0 wheels from the Python package index, installed once into a
//!    cache (`~/.cache/starflow/cuda-13.0`, or `--cache DIR` / `$STARFLOW_CUDA_CACHE`). Pinned because
//!    cudarc 0.19.10 refuses toolkits it does not know (13.5 panics its build script), and because
//!    `nvidia-nvvm` (the front end `cicc`) must match `nvcc`, or `ptxas` rejects the PTX version.
//! 2. **Link directory**: unversioned symlinks to the wheels' `libnvrtc`, `libcurand`, `libcublas`,
//!    `libcublasLt` and `libcudart` (the linker looks for `libX.so`), and a **stub** `libcuda.so.1`
//!    exporting the driver-API functions cudarc declares. The driver library only comes with a
//!    driver; the stub only satisfies the linker and is never shipped: at run time the binary asks
//!    for `libcuda.so.1` and the GPU machine's driver provides it.
//! 3. **Build**: the CLI and the GPU check (`starflow-gpu-check`) with `--features cuda` into their
//!    own target directory (`target/cuda`), so the ordinary CPU build keeps its cache. The kernels'
//!    PTX is compiled for `CUDA_COMPUTE_CAP` (90 = H100/H200 by default; `--compute-cap N`); a
//!    change of toolkit or compute capability removes the stale PTX first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::root;

/// The wheels of one CUDA 13.0 toolkit: compiler (`nvcc` + `cicc` + headers) and the libraries
/// candle links. The versions are the 13.0 releases on the index, matched to each other.
pub const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];

/// The libraries candle's CUDA backend links, by their linker names.
const LINKED: &[&str] = &["nvrtc", "curand", "cublas", "cublasLt", "cudart"];

const HELP: &str = "\
cargo xtask cuda-build [--cache DIR] [--compute-cap N] [--target-dir DIR]

Builds `starflow` and `starflow-gpu-check` with the `cuda` feature, on any Linux x86-64 machine
(no GPU needed). Installs the pinned CUDA 13.0 wheels once into the cache (default
$STARFLOW_CUDA_CACHE, else ~/.cache/starflow/cuda-13.0), compiles the kernels for compute
capability N (default 90: H100/H200), and prints where the binaries are.
";

struct Options {
    cache: PathBuf,
    compute_cap: String,
    target_dir: PathBuf,
}

fn parse(args: &[String]) -> Result<Option<Options>> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut opts = Options {
        cache: std::env::var_os("STARFLOW_CUDA_CACHE")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".cache/starflow/cuda-13.0")))
            .context("neither $STARFLOW_CUDA_CACHE nor $HOME is set; pass --cache DIR")?,
        compute_cap: "90".into(),
        target_dir: root().join("target").join("cuda"),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| crate::option_value(&mut it, name, HELP);
        match arg.as_str() {
            "--cache" => opts.cache = PathBuf::from(value("--cache")?),
            "--compute-cap" => opts.compute_cap = value("--compute-cap")?,
            "--target-dir" => opts.target_dir = PathBuf::from(value("--target-dir")?),
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            other => bail!("unknown argument `{other}`\n\n{HELP}"),
        }
    }
    if opts.compute_cap.is_empty() || !opts.compute_cap.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "--compute-cap {}: expected the GPU's compute capability as digits, e.g. 90 for H100/H200, 80 for A100",
            opts.compute_cap
        );
    }
    Ok(Some(opts))
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse(args)? else {
        return Ok(());
    };
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!("cuda-build installs Linux x86-64 wheels; run it on a Linux x86-64 machine");
    }
    let started = Instant::now();
    let toolkit = install_toolkit(&opts.cache)?;
    let wheels_s = started.elapsed().as_secs_f64();
    let link = link_dir(&opts.cache, &toolkit)?;
    forget_stale_kernels(&opts)?;
    let build_started = Instant::now();
    build(&opts, &toolkit, &link)?;
    let build_s = build_started.elapsed().as_secs_f64();
    let release = opts.target_dir.join("release");
    eprintln!(
        "\nxtask cuda-build: done in {:.0} s (toolkit {:.0} s, build {:.0} s)",
        started.elapsed().as_secs_f64(),
        wheels_s,
        build_s
    );
    for bin in ["starflow", "starflow-gpu-check"] {
        let path = release.join(bin);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!("  {} ({:.0} MB)", path.display(), size as f64 / 1e6);
    }
    eprintln!(
        "They need the GPU machine's driver (libcuda.so.1) and CUDA 13 cuBLAS, cuRAND, NVRTC and the \
         runtime: take them from the machine's CUDA 13 install, or put {} on LD_LIBRARY_PATH.\n\
         Next: `cargo xtask gpu-check` packs the GPU check for a GPU machine (README, \"On a GPU\").",
        toolkit.join("lib").display()
    );
    Ok(())
}

/// Installs [`WHEELS`] into `cache/toolkit` unless a stamp says this exact list is there; returns
/// the toolkit root (`…/nvidia/cu13`, with `bin`, `lib`, `include`, `nvvm`).
fn install_toolkit(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("toolkit");
    let stamp = dir.join(".starflow-wheels");
    let want = WHEELS.join("\n");
    let root = dir.join("nvidia").join("cu13");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        eprintln!("CUDA toolkit wheels already in {}", dir.display());
        return Ok(root);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the incomplete {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let python = std::env::var("STARFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(["--no-deps", "--target"])
    .arg(&dir)
    .args(WHEELS);
    eprintln!(
        "$ {python} -m pip install --no-deps --target {} {}",
        dir.display(),
        WHEELS.join(" ")
    );
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{python} -m pip`: install Python 3 with pip"))?;
    if !status.success() {
        bail!("installing the CUDA wheels failed ({status}); the package index must be reachable");
    }
    for tool in ["bin/nvcc", "nvvm/bin/cicc", "bin/ptxas"] {
        if !root.join(tool).exists() {
            bail!(
                "the CUDA wheels installed, but {} is missing: the wheels' layout changed; update xtask/src/cuda_build.rs",
                root.join(tool).display()
            );
        }
    }
    std::fs::write(&stamp, want).context("writing the wheel stamp")?;
    Ok(root)
}

/// A directory for `-L`: unversioned links to the wheels' libraries and the stub `libcuda`.
fn link_dir(cache: &Path, toolkit: &Path) -> Result<PathBuf> {
    let link = cache.join("link");
    std::fs::create_dir_all(&link).with_context(|| format!("creating {}", link.display()))?;
    let lib = toolkit.join("lib");
    for name in LINKED {
        let target = versioned(&lib, name)?;
        let path = link.join(format!("lib{name}.so"));
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path)
            .with_context(|| format!("linking {} to {}", path.display(), target.display()))?;
    }
    stub_libcuda(&link)?;
    Ok(link)
}

/// `lib/libNAME.so.<major>`: the shortest versioned file of that library.
fn versioned(lib: &Path, name: &str) -> Result<PathBuf> {
    let prefix = format!("lib{name}.so.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    found.sort_by_key(|p| p.as_os_str().len());
    found
        .into_iter()
        .next()
        .with_context(|| format!("{} has no {prefix}*: a wheel is missing", lib.display()))
}

/// The driver-API functions cudarc declares (`pub unsafe fn cuXxx(` in its driver bindings).
pub fn driver_symbols(bindings: &str) -> Vec<String> {
    let mut names: Vec<String> = bindings
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| {
            name.starts_with("cu") && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A C stub with one function per driver symbol, each returning CUDA_ERROR_STUB_LIBRARY (34).
pub fn stub_source(symbols: &[String]) -> String {
    let mut c = String::from(
        "/* Link-time stand-in for the CUDA driver (libcuda.so.1), made by `cargo xtask cuda-build`.\n   \
         Never shipped: the GPU machine's driver provides the real library at run time. */\n",
    );
    for s in symbols {
        c.push_str(&format!("int {s}(void) {{ return 34; }}\n"));
    }
    c
}

/// Compiles the stub `libcuda.so.1` (and its `libcuda.so` link) into `link`.
fn stub_libcuda(link: &Path) -> Result<()> {
    let bindings = cudarc_driver_bindings()?;
    let text = std::fs::read_to_string(&bindings)
        .with_context(|| format!("reading {}", bindings.display()))?;
    let symbols = driver_symbols(&text);
    if symbols.len() < 100 {
        bail!(
            "found only {} driver functions in {}: cudarc's bindings changed; update xtask/src/cuda_build.rs",
            symbols.len(),
            bindings.display()
        );
    }
    let src = link.join("cuda_stub.c");
    std::fs::write(&src, stub_source(&symbols)).context("writing the libcuda stub")?;
    let so = link.join("libcuda.so.1");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .context("could not run `cc` to build the libcuda stub: install gcc")?;
    if !status.success() {
        bail!("compiling the libcuda stub failed ({status})");
    }
    let plain = link.join("libcuda.so");
    let _ = std::fs::remove_file(&plain);
    std::os::unix::fs::symlink("libcuda.so.1", &plain).context("linking libcuda.so")?;
    eprintln!(
        "stub libcuda.so.1 ({} driver functions) in {}",
        symbols.len(),
        link.display()
    );
    Ok(())
}

/// cudarc's driver bindings in cargo's registry, located through `cargo metadata` (which also
/// downloads the crate on a fresh machine).
fn cudarc_driver_bindings() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "starflow-cli/cuda",
        ])
        .current_dir(root())
        .output()
        .context("could not run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's JSON")?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in Cargo.lock: is candle's cuda feature still wired to starflow-cli/cuda?")?;
    Ok(Path::new(manifest)
        .parent()
        .context("cudarc's manifest path")?
        .join("src/driver/sys/mod.rs"))
}

/// PTX compiled by another toolkit or for another GPU survives in candle-kernels' build output;
/// remove it when either changed since the last build into this target directory.
fn forget_stale_kernels(opts: &Options) -> Result<()> {
    let stamp = opts.target_dir.join(".starflow-cuda");
    let want = format!("{}\ncompute_cap={}", WHEELS.join("\n"), opts.compute_cap);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    let build = opts.target_dir.join("release").join("build");
    if let Ok(entries) = std::fs::read_dir(&build) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("candle-kernels-")
            {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("removing stale kernels {}", e.path().display()))?;
            }
        }
    }
    std::fs::create_dir_all(&opts.target_dir)?;
    std::fs::write(&stamp, want).context("writing the cuda build stamp")?;
    Ok(())
}

/// `cargo build --release --features cuda` of the CLI and the GPU check, with the toolkit on PATH.
fn build(opts: &Options, toolkit: &Path, link: &Path) -> Result<()> {
    let path = std::env::join_paths(std::iter::once(toolkit.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .context("PATH")?;
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(&format!(" -L native={}", link.display()));
    let toolkit = toolkit.to_string_lossy().into_owned();
    let target_dir = opts.target_dir.to_string_lossy().into_owned();
    crate::cargo_env(
        &[
            "build",
            "--release",
            "--target-dir",
            &target_dir,
            "-p",
            "starflow-cli",
            "-p",
            "starflow-gpu-check",
            "--features",
            "starflow-cli/cuda,starflow-gpu-check/cuda",
        ],
        &[
            ("PATH", &path.to_string_lossy()),
            ("CUDA_ROOT", &toolkit),
            ("CUDA_PATH", &toolkit),
            ("CUDA_HOME", &toolkit),
            ("CUDA_COMPUTE_CAP", &opts.compute_cap),
            ("RUSTFLAGS", rustflags.trim()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stub exports exactly the functions of the bindings, once each, from cudarc's layout:
    /// both `#[cfg]` arms of a binding and helper functions that are not driver calls are ignored.
    #[test]
    fn driver_symbols_come_from_the_bindings_functions() {
        let bindings = "\
pub unsafe fn cuInit(Flags: ::core::ffi::c_uint) -> CUresult {
    #[cfg(not(feature = \"dynamic-loading\"))]
    {
        extern \"C\" {
            fn cuInit(Flags: ::core::ffi::c_uint) -> CUresult;
        }
        cuInit(Flags)
    }
}
    pub unsafe fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
pub unsafe fn load<F>(name: &str) -> F {
pub unsafe fn cuInit(Flags: u32) -> CUresult {
";
        assert_eq!(driver_symbols(bindings), ["cuInit", "cuMemAlloc_v2"]);
        let c = stub_source(&driver_symbols(bindings));
        assert!(c.contains("int cuInit(void) { return 34; }"));
        assert_eq!(c.matches("return 34").count(), 2);
    }

    #[test]
    fn compute_capability_must_be_digits() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&["--compute-cap", "sm_90"])).is_err());
        assert!(parse(&args(&["--compute-cap"])).is_err());
        assert!(parse(&args(&["--frobnicate"])).is_err());
        let o = parse(&args(&["--compute-cap", "80", "--cache", "/x"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.compute_cap.as_str(), o.cache.as_path()),
            ("80", Path::new("/x"))
        );
    }
}
