//! A short, deterministic fuzz run of the npy header parser that fits stable CI: the checked-in seed
//! corpus of the cargo-fuzz target (`fuzz/seeds/npy_header`) plus tens of thousands of seeded mutations
//! (ChaCha8, fixed seed, so a failure reproduces exactly), each checked against the same property as the
//! real fuzzer (`npy_property`). Real coverage-guided fuzzing needs nightly: see `fuzz/Cargo.toml`.

mod npy_property;

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starflow_data::npy::{parse_header, Dtype};

/// Mutated inputs per run: well under a second in the dev profile.
const MUTATIONS: usize = 200_000;

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/npy_header");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("seed"))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "seed corpus too small: {}", seeds.len());
    seeds
}

/// What a seed must parse to: dtype, big-endian, Fortran order, shape (None: rejected).
type Expected = (Dtype, bool, bool, &'static [usize]);

/// The seeds are real numpy output (and a few old spellings): each must parse to what its name says,
/// so that the mutations below start from headers the parser accepts.
#[test]
fn seeds_parse_as_named() {
    let expect: &[(&str, Option<Expected>)] = &[
        (
            "v1_f4_le_2x3.npy",
            Some((Dtype::F32, false, false, &[2, 3])),
        ),
        ("v1_f8_le_3.npy", Some((Dtype::F64, false, false, &[3]))),
        ("v1_f4_be_2x2.npy", Some((Dtype::F32, true, false, &[2, 2]))),
        ("v1_f8_be_2x1.npy", Some((Dtype::F64, true, false, &[2, 1]))),
        (
            "v1_f4_fortran_2x3.npy",
            Some((Dtype::F32, false, true, &[2, 3])),
        ),
        ("v1_f8_scalar.npy", Some((Dtype::F64, false, false, &[]))),
        (
            "v1_f4_empty_0x16.npy",
            Some((Dtype::F32, false, false, &[0, 16])),
        ),
        (
            "v1_f4_3d_1x2x2.npy",
            Some((Dtype::F32, false, false, &[1, 2, 2])),
        ),
        (
            "v2_f4_le_2x3.npy",
            Some((Dtype::F32, false, false, &[2, 3])),
        ),
        (
            "v2_f8_be_fortran_2x2.npy",
            Some((Dtype::F64, true, true, &[2, 2])),
        ),
        (
            "v3_f4_le_2x3.npy",
            Some((Dtype::F32, false, false, &[2, 3])),
        ),
        ("v3_f8_le_4.npy", Some((Dtype::F64, false, false, &[4]))),
        (
            "v1_double_quotes_long_dims.npy",
            Some((Dtype::F64, false, false, &[3, 4])),
        ),
        (
            "v1_native_eq_f4.npy",
            Some((Dtype::F32, false, false, &[4])),
        ),
        (
            "v1_huge_dims.npy",
            Some((Dtype::F32, false, false, &[usize::MAX, 2])),
        ),
        ("v1_i4_le_3.npy", None),
        ("v1_u2_structured.npy", None),
        ("v3_utf8_padding.npy", None),
    ];
    let seeds = seeds();
    for (name, want) in expect {
        let (_, bytes) = seeds
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("seed {name} missing"));
        let got = parse_header(bytes);
        match (want, got) {
            (Some((dtype, be, fortran, shape)), Ok(h)) => {
                assert_eq!(
                    (h.dtype, h.big_endian, h.fortran_order, h.shape.as_slice()),
                    (*dtype, *be, *fortran, *shape),
                    "{name}"
                );
                assert!(h.data_offset <= bytes.len(), "{name}");
            }
            (None, Err(_)) => {}
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
    for (name, bytes) in &seeds {
        npy_property::check(bytes);
        assert!(
            expect.iter().any(|(n, _)| n == name),
            "seed {name} has no expectation"
        );
    }
}

/// Fragments that steer mutations into the dict grammar instead of random bytes.
const TOKENS: &[&str] = &[
    "'descr'",
    "'shape'",
    "'fortran_order'",
    "\"descr\"",
    ": ",
    ", ",
    "True",
    "False",
    "(",
    ")",
    ",)",
    "{",
    "}",
    "'<f4'",
    "'>f8'",
    "'=f8'",
    "'<i8'",
    "'|u1'",
    "L",
    "-1",
    "+3",
    "0",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "\u{e9}",
    "\u{1F600}",
    "\0",
    "\n",
    "'",
    "\"",
    "\\",
];

/// Applies one random mutation, libFuzzer style (bit flips, byte sets, inserts, deletes, token
/// insertion, header-length and version edits, splices with another seed).
fn mutate(rng: &mut ChaCha8Rng, input: &mut Vec<u8>, other: &[u8]) {
    let len = input.len();
    match rng.random_range(0..9) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = rng.random();
        }
        2 => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
            let at = rng.random_range(0..=len);
            input.splice(at..at, token.iter().copied());
        }
        3 if len > 0 => {
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=16)).min(len);
            input.drain(a..b);
        }
        4 => input.truncate(rng.random_range(0..=len)),
        5 if len >= 12 => {
            // The declared header length: off by a little, zero, or the field's maximum.
            let v1 = input[6] == 1;
            let field = if v1 { 8..10 } else { 8..12 };
            let cur = if v1 {
                u16::from_le_bytes([input[8], input[9]]) as i64
            } else {
                u32::from_le_bytes([input[8], input[9], input[10], input[11]]) as i64
            };
            let new = match rng.random_range(0..4) {
                0 => cur + rng.random_range(-3..=3),
                1 => 0,
                2 => i64::MAX,
                _ => rng.random_range(0..256),
            };
            let bytes = if v1 {
                (new.clamp(0, u16::MAX as i64) as u16)
                    .to_le_bytes()
                    .to_vec()
            } else {
                (new.clamp(0, u32::MAX as i64) as u32)
                    .to_le_bytes()
                    .to_vec()
            };
            input[field].copy_from_slice(&bytes);
        }
        6 if len >= 8 => input[6] = rng.random_range(0..5),
        7 => {
            let cut = rng.random_range(0..=len);
            let from = rng.random_range(0..=other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            // Replace a digit run in the shape with a random number, possibly huge.
            if let Some(p) = input.iter().position(|b| *b == b'(') {
                let n: u64 = match rng.random_range(0..3) {
                    0 => rng.random_range(0..10),
                    1 => rng.random(),
                    _ => u64::MAX - rng.random_range(0..3),
                };
                input.splice(p + 1..p + 1, n.to_string().bytes().chain(*b", "));
            }
        }
    }
}

#[test]
fn seeded_mutations_hold_the_property() {
    let seeds = seeds();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_5EED);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for _ in 0..MUTATIONS {
        let (_, base) = &seeds[rng.random_range(0..seeds.len())];
        let (_, other) = &seeds[rng.random_range(0..seeds.len())];
        let mut input = base.clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut input, other);
        }
        npy_property::check(&input);
        if parse_header(&input).is_ok() {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    eprintln!("{MUTATIONS} mutations: {accepted} accepted, {rejected} rejected");
    // A mutator that only ever produced garbage (or never broke anything) would test nothing.
    assert!(
        accepted > MUTATIONS / 20 && rejected > MUTATIONS / 20,
        "{accepted} accepted, {rejected} rejected"
    );
}

/// Inputs the property once rejected, kept so they stay fixed.
#[test]
fn regressions() {
    // A long garbage header used to be echoed whole in the error message.
    let mut long = b"\x93NUMPY\x01\x00".to_vec();
    let dict = format!("{{'descr': '<f4', {}}}", "x".repeat(3000));
    long.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    long.extend_from_slice(dict.as_bytes());
    npy_property::check(&long);
    let e = parse_header(&long).unwrap_err();
    assert!(e.problem.contains("malformed npy header"), "{}", e.problem);
}
