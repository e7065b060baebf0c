//! Evaluate a flow's log-density on points read from `.npy` files: a starting point for reusers
//! and a driver for external checks against the reference implementation.
//!
//! ```text
//! cargo run --release -p starflow-flows --example logprob -- \
//!     --flow <diagonal_gaussian|full_gaussian|full_flow> \
//!     --params P.npy --x X.npy --out LP.npy [--base-out Z.npy]
//! ```
//!
//! `P.npy` holds f64 `(B, n_params)` raw flow parameters, `X.npy` f64 `(B, 3)` points; the
//! output is f64 `(B,)` log-densities and optionally the f64 `(B, 3)` base points. The tiny
//! `.npy` reader and writer below handle little-endian f64 arrays in C order (format versions
//! 1.0 to 3.0), which is what `numpy.save` writes for a float64 array.

use std::collections::HashMap;
use std::process::ExitCode;

use candle_core::{Device, Tensor};
use starflow_flows::flow_by_name;

const USAGE: &str = "usage: logprob --flow <diagonal_gaussian|full_gaussian|full_flow> \
--params P.npy --x X.npy --out LP.npy [--base-out Z.npy]";

/// An f64 array read from or written to `.npy`.
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// Parses `--key value` pairs; every key must be known and given once.
fn parse_args(args: &[String]) -> Result<HashMap<String, String>, String> {
    let known = ["--flow", "--params", "--x", "--out", "--base-out"];
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(key) = it.next() {
        if key == "-h" || key == "--help" {
            return Err(USAGE.to_string());
        }
        if !known.contains(&key.as_str()) {
            return Err(format!("unknown argument {key:?}\n{USAGE}"));
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{key} needs a value\n{USAGE}"))?;
        if out.insert(key.clone(), value.clone()).is_some() {
            return Err(format!("{key} given twice"));
        }
    }
    for key in ["--flow", "--params", "--x", "--out"] {
        if !out.contains_key(key) {
            return Err(format!("missing {key}\n{USAGE}"));
        }
    }
    Ok(out)
}

/// Value of `'key':` in a numpy header dict, up to the next top-level comma or closing brace.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn read_npy(path: &str) -> Result<Array, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: cannot read: {e}"))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{path}: not an .npy file (bad magic)"));
    }
    let (header_len, offset) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("{path}: unsupported .npy version {v}")),
    };
    let data_start = offset + header_len;
    let header = bytes
        .get(offset..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| format!("{path}: truncated or non-text header"))?;
    let descr =
        header_field(header, "descr").ok_or_else(|| format!("{path}: header has no descr"))?;
    if descr.trim_matches(|c| c == '\'' || c == '"') != "<f8" {
        return Err(format!("{path}: dtype {descr} is not little-endian float64 ('<f8'); save with .astype(np.float64)"));
    }
    let fortran = header_field(header, "fortran_order")
        .ok_or_else(|| format!("{path}: header has no fortran_order"))?;
    if fortran != "False" {
        return Err(format!(
            "{path}: Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)"
        ));
    }
    let shape_txt =
        header_field(header, "shape").ok_or_else(|| format!("{path}: header has no shape"))?;
    let shape = shape_txt
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("{path}: bad shape {shape_txt}"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[data_start..];
    if body.len() != 8 * n {
        return Err(format!(
            "{path}: shape {shape:?} needs {} data bytes, file has {}",
            8 * n,
            body.len()
        ));
    }
    let data = body
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok(Array { shape, data })
}

fn write_npy(path: &str, a: &Array) -> Result<(), String> {
    let shape = match a.shape.as_slice() {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad with spaces so that magic + version + length + header is a multiple of 64, ending in '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 8 * a.data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in &a.data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| format!("{path}: cannot write: {e}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let opts = parse_args(args)?;
    let name = &opts["--flow"];
    let flow = flow_by_name(name, 3).map_err(|e| e.to_string())?;
    let params = read_npy(&opts["--params"])?;
    let x = read_npy(&opts["--x"])?;
    let (b, p) = match params.shape.as_slice() {
        [b, p] => (*b, *p),
        s => {
            return Err(format!(
                "--params must be 2-D (B, {}), got shape {s:?}",
                flow.n_params()
            ))
        }
    };
    if p != flow.n_params() {
        return Err(format!(
            "--params has {p} columns, {name} needs {}",
            flow.n_params()
        ));
    }
    if x.shape != [b, flow.dim()] {
        return Err(format!(
            "--x must have shape ({b}, {}), got {:?}",
            flow.dim(),
            x.shape
        ));
    }
    let dev = Device::Cpu;
    let pt = Tensor::from_vec(params.data, (b, p), &dev).map_err(|e| e.to_string())?;
    let xt = Tensor::from_vec(x.data, (b, flow.dim()), &dev).map_err(|e| e.to_string())?;
    let parts = flow.log_prob_parts(&pt, &xt).map_err(|e| e.to_string())?;
    let lp = parts.log_prob.to_vec1::<f64>().map_err(|e| e.to_string())?;
    write_npy(
        &opts["--out"],
        &Array {
            shape: vec![b],
            data: lp,
        },
    )?;
    if let Some(path) = opts.get("--base-out") {
        let z = parts
            .z
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| e.to_string())?;
        write_npy(
            path,
            &Array {
                shape: vec![b, flow.dim()],
                data: z,
            },
        )?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("logprob: {msg}");
            ExitCode::FAILURE
        }
    }
}
