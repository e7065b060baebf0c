//! `starflow._native`: the Python bindings, a thin layer over the starflow crates.
//!
//! Every computation happens in the Rust crates; this layer converts arguments (numpy arrays are
//! lent without a copy where their layout allows), releases the GIL around long work, and turns
//! errors into Python exceptions with the command line's messages (see [`errors`]). The pure
//! Python part of the package (`python/starflow/__init__.py`) re-exports these and adds the
//! keyword-argument form of `train` and its progress display.

mod arrays;
mod errors;
mod flow;
mod run;
mod synth;
mod train;

use pyo3::prelude::*;

/// Makes the process's allocator (glibc) keep large freed blocks for reuse, as the `starflow`
/// command does at startup: prediction and training then stop faulting tens of megabytes back in
/// at every batch (measured: predict ~20 % faster at 16,384 px). Process-wide and permanent, and
/// freed memory stays with the process, so the package never does it on its own: call it once in a
/// session that predicts or trains at scale. Returns whether it applied (false off glibc).
#[pyfunction]
fn tune_allocator() -> bool {
    starflow_models::tune_allocator()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FLOW_NAMES", starflow_flows::FLOW_NAMES.to_vec())?;
    m.add_class::<run::Run>()?;
    m.add_class::<flow::Flow>()?;
    m.add_function(wrap_pyfunction!(run::load_run, m)?)?;
    m.add_function(wrap_pyfunction!(synth::synth, m)?)?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    m.add_function(wrap_pyfunction!(tune_allocator, m)?)?;
    Ok(())
}
