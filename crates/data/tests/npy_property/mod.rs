//! The property the npy header parser must hold for *any* input, shared by the stable seeded test
//! (`tests/fuzz_header.rs`, run by CI) and the cargo-fuzz target (`fuzz/fuzz_targets/npy_header.rs`, which
//! includes this file by path), so that the quick CI run and a long fuzz run check exactly the same thing.
//!
//! `parse_header` must never panic, and:
//! - an error carries a non-empty problem and fix, and a problem of bounded length
//!   (it is shown to users as one line, so echoing a megabyte of garbage header is a bug);
//! - an accepted header starts with the magic and a supported version, its `data_offset` is exactly the
//!   end of the declared header and inside the input, and its text is a `{...}` dict;
//! - `n_elements` is the checked product of the shape (None exactly when it overflows) and the byte size
//!   the reader derives from it never overflows unchecked;
//! - the writer agrees with the reader: re-encoding the parsed shape with `npy_header` parses back to the
//!   same shape, C order, little-endian, with the data 64-byte aligned.

#![allow(dead_code)]

use starflow_data::npy::{npy_header, parse_header, Dtype};

/// Longest error `problem` accepted, whatever the input size: the header echo is cut to 160 characters,
/// each at most 10 bytes once escaped.
pub const MAX_PROBLEM_LEN: usize = 2048;

/// Checks the property on one input; panics (a fuzz crash, a test failure) when it is violated.
pub fn check(bytes: &[u8]) {
    let header = match parse_header(bytes) {
        Ok(h) => h,
        Err(e) => {
            assert!(
                !e.problem.is_empty() && !e.fix.is_empty(),
                "empty error {e:?}"
            );
            assert!(
                e.problem.len() <= MAX_PROBLEM_LEN,
                "error message of {} bytes: {:?}…",
                e.problem.len(),
                &e.problem.chars().take(120).collect::<String>()
            );
            return;
        }
    };
    assert_eq!(&bytes[..6], b"\x93NUMPY", "accepted without the magic");
    let (start, len) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 => (
            12,
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
        ),
        v => panic!("accepted npy version {v}"),
    };
    assert_eq!(
        header.data_offset,
        start + len,
        "data offset off the header end"
    );
    assert!(
        header.data_offset <= bytes.len(),
        "data offset past the input"
    );
    let text = std::str::from_utf8(&bytes[start..header.data_offset]).expect("accepted non-UTF-8");
    assert!(text.trim().starts_with('{') && text.trim().ends_with('}'));

    let product = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    assert_eq!(header.n_elements(), product);
    let _ = product.and_then(|n| n.checked_mul(header.dtype.size()));
    assert!(matches!(header.dtype, Dtype::F32 | Dtype::F64));

    // Writer agreement (version 1 up to a 64 KiB header, version 2 beyond, as numpy writes them).
    let encoded = npy_header::<f32>(&header.shape).expect("a parsed shape fits a header");
    let back = parse_header(&encoded).expect("npy_header output must parse");
    assert_eq!(back.shape, header.shape);
    assert_eq!(
        (back.dtype, back.big_endian, back.fortran_order),
        (Dtype::F32, false, false)
    );
    assert_eq!(back.data_offset, encoded.len());
    assert_eq!(back.data_offset % 64, 0, "unaligned data");
}
