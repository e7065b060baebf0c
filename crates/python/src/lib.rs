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

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FLOW_NAMES", starflow_flows::FLOW_NAMES.to_vec())?;
    m.add_class::<run::Run>()?;
    m.add_class::<flow::Flow>()?;
    m.add_function(wrap_pyfunction!(run::load_run, m)?)?;
    m.add_function(wrap_pyfunction!(synth::synth, m)?)?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    Ok(())
}
