//! Test helpers: fixture paths, safetensors fixture loading, and tolerance checks that report
//! the max abs error.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Loads every tensor of a fixture file on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    let p = fixture(rel);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", p.display()))
}

/// Gets tensor `name` from a loaded fixture.
pub fn get(m: &HashMap<String, Tensor>, name: &str) -> Tensor {
    m.get(name)
        .unwrap_or_else(|| panic!("fixture has no tensor `{name}`; regenerate fixtures"))
        .clone()
}

/// Max absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `actual` is within `tol` (max abs error) of `expected`, printing the error either way.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shape {:?} vs reference {:?}",
        actual.dims(),
        expected.dims()
    );
    let err = max_abs_diff(actual, expected);
    let scale = expected
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("{what}: max abs err {err:.3e} (tol {tol:.0e}, reference max |x| {scale:.3})");
    assert!(
        err <= tol,
        "{what}: max abs err {err:.3e} exceeds {tol:.0e}"
    );
}

/// A CPU f32 tensor of standard-normal values, deterministic from `seed` (ChaCha8).
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
