//! A small, strict reader and writer for NumPy `.npy` files (format versions 1, 2 and 3).
//!
//! The real GALAH spectra are a 584 MB `float32` array, so the reader memory-maps the file and hands
//! out a zero-copy `&[f32]` view when the data is little-endian `f4` and aligned; anything else is
//! converted row by row on demand. We parse the header ourselves rather than pulling in a crate: the
//! format is tiny, and owning the parser lets every failure name the file, the problem and the fix
//! (and lets the header parser be fuzzed on its own, see [`parse_header`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{DataError, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types starflow reads. Spectra and labels are floating point by nature; integer or
/// complex arrays are rejected with a conversion hint instead of being silently reinterpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    /// The NumPy spelling, e.g. `float32`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
        }
    }
}

/// The parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub big_endian: bool,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Byte offset of the first element.
    pub data_offset: usize,
}

impl Header {
    /// Number of elements (product of the shape; 1 for a 0-d array).
    pub fn n_elements(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

/// Why a header could not be parsed, without the file name (added by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderError {
    pub problem: String,
    pub fix: String,
}

fn header_err(problem: impl Into<String>, fix: &str) -> HeaderError {
    HeaderError {
        problem: problem.into(),
        fix: fix.to_string(),
    }
}

const FIX_RESAVE: &str =
    "re-save the array with numpy: np.save(path, np.asarray(arr, dtype=np.float32))";

/// Parses the magic, version and header dictionary at the start of `bytes`.
///
/// Works on any byte slice (it never reads past it), so it is the fuzzing entry point.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<Header, HeaderError> {
    if bytes.is_empty() {
        return Err(header_err("the file is empty", FIX_RESAVE));
    }
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(header_err(
            "not an npy file (missing the \\x93NUMPY magic bytes)",
            "pass a file written by numpy.save (HDF5 input needs the `hdf5` feature and a .h5 file)",
        ));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(header_err("the npy header is truncated", FIX_RESAVE));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
            (len, 12usize)
        }
        v => {
            return Err(header_err(
                format!("unsupported npy format version {v}.{}", bytes[7]),
                FIX_RESAVE,
            ))
        }
    };
    let end = start
        .checked_add(header_len)
        .ok_or_else(|| header_err("the npy header length overflows", FIX_RESAVE))?;
    if bytes.len() < end {
        return Err(header_err(
            format!(
                "the npy header is truncated (it declares {header_len} bytes, the file has {})",
                bytes.len().saturating_sub(start)
            ),
            FIX_RESAVE,
        ));
    }
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| header_err("the npy header is not valid text", FIX_RESAVE))?;
    let dict = parse_dict(text)?;
    let descr = dict
        .descr
        .ok_or_else(|| header_err("the npy header has no 'descr' entry", FIX_RESAVE))?;
    let fortran_order = dict
        .fortran_order
        .ok_or_else(|| header_err("the npy header has no 'fortran_order' entry", FIX_RESAVE))?;
    let shape = dict
        .shape
        .ok_or_else(|| header_err("the npy header has no 'shape' entry", FIX_RESAVE))?;
    let (dtype, big_endian) = match descr.as_str() {
        "<f4" | "=f4" => (Dtype::F32, false),
        "<f8" | "=f8" => (Dtype::F64, false),
        ">f4" => (Dtype::F32, true),
        ">f8" => (Dtype::F64, true),
        other => {
            return Err(header_err(
                format!(
                    "unsupported dtype '{}' (starflow reads float32 or float64)",
                    cut(other)
                ),
                "convert with numpy: np.save(path, arr.astype(np.float32))",
            ))
        }
    };
    Ok(Header {
        dtype,
        big_endian,
        fortran_order,
        shape,
        data_offset: end,
    })
}

#[derive(Default)]
struct Dict {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<usize>>,
}

/// How much of a malformed header an error message quotes.
const HEADER_ECHO_CHARS: usize = 160;

/// `text` cut to [`HEADER_ECHO_CHARS`] for an error message: a corrupt file can declare megabytes of
/// header, and the message is printed as one line.
fn cut(text: &str) -> String {
    let mut shown: String = text.chars().take(HEADER_ECHO_CHARS).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

/// Parses the Python dict literal numpy writes: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_dict(text: &str) -> std::result::Result<Dict, HeaderError> {
    let bad = |what: &str| {
        header_err(
            format!("malformed npy header ({what}): {:?}", cut(text)),
            FIX_RESAVE,
        )
    };
    let mut s = text.trim();
    s = s
        .strip_prefix('{')
        .ok_or_else(|| bad("no opening brace"))?
        .trim_end();
    s = s.strip_suffix('}').ok_or_else(|| bad("no closing brace"))?;
    let mut dict = Dict::default();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = parse_quoted(rest).ok_or_else(|| bad("expected a quoted key"))?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| bad("expected ':' after a key"))?
            .trim_start();
        let after = match key {
            "descr" => {
                let (v, a) = parse_quoted(after).ok_or_else(|| bad("'descr' must be a string"))?;
                dict.descr = Some(v.to_string());
                a
            }
            "fortran_order" => {
                if let Some(a) = after.strip_prefix("True") {
                    dict.fortran_order = Some(true);
                    a
                } else if let Some(a) = after.strip_prefix("False") {
                    dict.fortran_order = Some(false);
                    a
                } else {
                    return Err(bad("'fortran_order' must be True or False"));
                }
            }
            "shape" => {
                let inner = after
                    .strip_prefix('(')
                    .ok_or_else(|| bad("'shape' must be a tuple"))?;
                let close = inner.find(')').ok_or_else(|| bad("unterminated shape"))?;
                let mut shape = Vec::new();
                for part in inner[..close].split(',') {
                    let part = part.trim();
                    if part.is_empty() {
                        continue;
                    }
                    let part = part.strip_suffix('L').unwrap_or(part);
                    shape.push(
                        part.parse::<usize>()
                            .map_err(|_| bad("non-integer dimension"))?,
                    );
                }
                dict.shape = Some(shape);
                &inner[close + 1..]
            }
            _ => return Err(bad("unknown key")),
        };
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(bad("expected ',' between entries"));
        }
    }
    Ok(dict)
}

fn parse_quoted(s: &str) -> Option<(&str, &str)> {
    let quote = s.chars().next()?;
    if quote != '\'' && quote != '"' {
        return None;
    }
    let body = &s[1..];
    let end = body.find(quote)?;
    Some((&body[..end], &body[end + 1..]))
}

/// The bytes of a file: a memory map for real files, owned bytes for tiny ones (an empty file
/// cannot be mapped).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A memory-mapped, validated `.npy` array of float32 or float64.
pub struct NpyArray {
    path: PathBuf,
    header: Header,
    bytes: Bytes,
}

impl std::fmt::Debug for NpyArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpyArray")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl NpyArray {
    /// Opens and validates `path`: magic, header, dtype, C order and that the file holds all the
    /// data the header promises. The data itself is not read until used.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| DataError::Open {
            path: path.clone(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(DataError::npy(
                &path,
                "is a directory, not an npy file",
                "pass the .npy file inside it",
            ));
        }
        let bytes = if len < 4096 {
            Bytes::Owned(std::fs::read(&path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?)
        } else {
            // SAFETY: the map is read-only; starflow never writes to input files while they are
            // open. A concurrent external truncation would fault, a risk every mmap reader shares
            // and the price of not holding a second copy of a 584 MB file in memory.
            Bytes::Mapped(unsafe { Mmap::map(&file) }.map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?)
        };
        let header = parse_header(&bytes).map_err(|e| DataError::npy(&path, e.problem, e.fix))?;
        if header.fortran_order {
            return Err(DataError::npy(
                &path,
                "the array is stored in Fortran (column-major) order",
                "re-save it in C order: np.save(path, np.ascontiguousarray(arr))",
            ));
        }
        let n = header.n_elements().ok_or_else(|| {
            DataError::npy(&path, "the shape in the header overflows", FIX_RESAVE)
        })?;
        let need = n.checked_mul(header.dtype.size()).ok_or_else(|| {
            DataError::npy(&path, "the shape in the header overflows", FIX_RESAVE)
        })?;
        let have = bytes.len() - header.data_offset;
        if have < need {
            return Err(DataError::npy(
                &path,
                format!(
                    "the file is truncated: shape {:?} of {} needs {need} bytes of data, the file has {have}",
                    header.shape,
                    header.dtype.name()
                ),
                "the copy is incomplete; copy or download the file again",
            ));
        }
        Ok(NpyArray {
            path,
            header,
            bytes,
        })
    }

    /// The file this array was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.header.shape
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.header.dtype
    }

    /// Requires a 2-D array and returns `(rows, cols)`.
    pub fn shape2(&self, what: &str) -> Result<(usize, usize)> {
        match self.header.shape.as_slice() {
            &[r, c] => Ok((r, c)),
            s => Err(DataError::invalid(
                &self.path,
                format!(
                    "{what} must be a 2-D array, found {}-D with shape {s:?}",
                    s.len()
                ),
                format!("save {what} as a (rows, columns) array"),
            )),
        }
    }

    fn data(&self) -> &[u8] {
        let n = self.header.n_elements().unwrap_or(0) * self.header.dtype.size();
        &self.bytes[self.header.data_offset..self.header.data_offset + n]
    }

    /// A zero-copy view when the data is little-endian float32 and 4-byte aligned (always the case
    /// for files written by numpy, whose headers are padded to 64 bytes).
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        if self.header.dtype != Dtype::F32 || self.header.big_endian || cfg!(target_endian = "big")
        {
            return None;
        }
        let data = self.data();
        if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return None;
        }
        // SAFETY: the pointer is aligned for f32 (checked above), the length is a whole number of
        // f32 values (validated in `open`), every bit pattern is a valid f32, and the slice borrows
        // `self`, which owns the mapping.
        Some(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<f32>(), data.len() / 4) })
    }

    /// Element `i` (flat index) as f64, whatever the stored type and byte order.
    #[inline]
    fn get_f64(&self, data: &[u8], i: usize) -> f64 {
        match (self.header.dtype, self.header.big_endian) {
            (Dtype::F32, false) => f32::from_le_bytes(chunk(data, i * 4)) as f64,
            (Dtype::F32, true) => f32::from_be_bytes(chunk(data, i * 4)) as f64,
            (Dtype::F64, false) => f64::from_le_bytes(chunk(data, i * 8)),
            (Dtype::F64, true) => f64::from_be_bytes(chunk(data, i * 8)),
        }
    }

    /// Copies flat elements `start..start + out.len()` into `out` as f32.
    pub fn read_f32_into(&self, start: usize, out: &mut [f32]) {
        if let Some(s) = self.as_f32_slice() {
            out.copy_from_slice(&s[start..start + out.len()]);
            return;
        }
        let data = self.data();
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.get_f64(data, start + k) as f32;
        }
    }

    /// Copies flat elements `start..start + out.len()` into `out` as f64.
    pub fn read_f64_into(&self, start: usize, out: &mut [f64]) {
        let data = self.data();
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.get_f64(data, start + k);
        }
    }

    /// Tells the kernel that flat elements `start..start + len` will not be read again soon, so
    /// their pages leave this process's resident memory. Prediction over a survey reads each
    /// spectrum once; without this the mapped pages of a 60 GB file would all count as resident
    /// (reclaimable, but alarming in `top` and in batch schedulers' memory accounting). A later read
    /// of the range still works: the pages come back from the page cache or the file. Does nothing
    /// for a file read into memory (big-endian) or off Unix.
    pub fn release(&self, start: usize, len: usize) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = &self.bytes {
            let size = self.header.dtype.size();
            let offset = self.header.data_offset + start * size;
            let len = (len * size).min(m.len().saturating_sub(offset));
            // SAFETY: `Mmap::map` made a shared read-only mapping that this process never writes;
            // MADV_DONTNEED on it only drops page-table entries, and the next access re-reads the
            // same bytes from the file, so every slice into the mapping keeps its contents. The
            // range lies inside the mapping (clamped above).
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
    }

    /// All elements as an owned f64 vector (for small arrays such as labels).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let mut v = vec![0.0; self.header.n_elements().unwrap_or(0)];
        self.read_f64_into(0, &mut v);
        v
    }
}

fn chunk<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&data[at..at + N]);
    b
}

/// Types that can be written to `.npy`.
pub trait NpyElement: Copy {
    /// The numpy `descr` string.
    const DESCR: &'static str;
    /// Appends the little-endian bytes of `values`.
    fn extend_le(values: &[Self], out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn extend_le(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 4);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl NpyElement for f64 {
    const DESCR: &'static str = "<f8";
    fn extend_le(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 8);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The `.npy` header for an array of `T` with `shape`, padded to a multiple of 64 bytes as numpy does so
/// that readers can map the data aligned. Version 1.0 stores the header length in 16 bits; a header
/// longer than 65,535 bytes (a shape with thousands of axes) gets version 2.0 and a 32-bit length, as
/// numpy writes it. Only a header beyond 4 GiB, which no reader accepts, is an error.
pub fn npy_header<T: NpyElement>(shape: &[usize]) -> Result<Vec<u8>> {
    let shape_str = match shape {
        [n] => format!("({n},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_str}, }}",
        T::DESCR
    );
    let padded = |prefix: usize, dict_len: usize| {
        let unpadded = prefix + dict_len + 1;
        dict_len + (64 - unpadded % 64) % 64 + 1
    };
    let (version, prefix) = if padded(10, dict.len()) <= u16::MAX as usize {
        (1u8, 10usize)
    } else {
        (2u8, 12usize)
    };
    let total = padded(prefix, dict.len());
    dict.push_str(&" ".repeat(total - dict.len() - 1));
    dict.push('\n');
    let mut out = Vec::with_capacity(prefix + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        let len = u32::try_from(dict.len()).map_err(|_| {
            DataError::config(
                "npy shape",
                format!(
                    "a shape with {} axes needs a {}-byte npy header, beyond the format's 4 GiB limit",
                    shape.len(),
                    dict.len()
                ),
            )
        })?;
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

/// Encodes `data` with `shape` as a complete `.npy` byte string.
pub fn encode_npy<T: NpyElement>(shape: &[usize], data: &[T]) -> Result<Vec<u8>> {
    let mut out = npy_header::<T>(shape)?;
    T::extend_le(data, &mut out);
    Ok(out)
}

/// Writes an `.npy` file atomically (see [`crate::atomic_file`]), streaming the data in chunks so
/// that a 584 MB array is never copied whole.
pub fn write_npy<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    let path = path.as_ref();
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(DataError::config(
            "npy shape",
            format!(
                "shape {shape:?} does not match {} values for {}",
                data.len(),
                path.display()
            ),
        ));
    }
    let header = npy_header::<T>(shape)?;
    crate::atomic_file::write_with(path, |w| {
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for chunk in data.chunks(1 << 17) {
            buf.clear();
            T::extend_le(chunk, &mut buf);
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let bytes = encode_npy(&[2, 3], &[1f32, 2., 3., 4., 5., 6.]).unwrap();
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(h.dtype, Dtype::F32);
        assert!(!h.fortran_order);
        assert_eq!(h.data_offset % 64, 0);
    }

    #[test]
    fn a_header_beyond_16_bits_is_written_as_version_2() {
        // 30,000 axes of length 1: "1, " each, about 90 kB of header.
        let shape = vec![1usize; 30_000];
        let bytes = npy_header::<f64>(&shape).unwrap();
        assert_eq!(&bytes[6..8], &[2, 0]);
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.shape, shape);
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.data_offset, bytes.len());
        // A short one stays version 1.
        assert_eq!(&npy_header::<f64>(&[3, 4]).unwrap()[6..8], &[1, 0]);
    }

    #[test]
    fn parses_numpy_spellings() {
        for (dict, shape) in [
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (5,), }",
                vec![5],
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (), }",
                vec![],
            ),
            (
                "{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (3L, 4L)}",
                vec![3, 4],
            ),
        ] {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&[1, 0]);
            b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            assert_eq!(parse_header(&b).unwrap().shape, shape, "{dict}");
        }
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bytes in [
            &b""[..],
            b"\x93NUMPY",
            b"\x93NUMPY\x01\x00\xff\xff{",
            b"\x93NUMPY\x09\x00\x00\x00",
            b"\x93NUMPY\x01\x00\x05\x00{'a'}",
            b"PK\x03\x04 this is a zip",
        ] {
            assert!(parse_header(bytes).is_err());
        }
    }
}
