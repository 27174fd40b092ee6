//! `ddpm._ddpm`: the Python bindings' native half, a thin layer over the `ddpm` crate's public
//! API (docs/python.md). Everything numeric is the crate's own code path, so what Python gets is
//! bit for bit what `ddpm vectors`, `ddpm eval` and `ddpm sample` compute.
//!
//! Conventions of this layer: arrays in and out are float64 numpy arrays (anything numpy can
//! convert is accepted), timesteps are int64 code indices 0 … T−1 as improved-diffusion's, and
//! a model is any Python callable `(x_t, t) -> array` given the network's timestep (int64 when
//! integral, else float64). Bad input raises `ValueError` (`OSError` for a file that cannot be
//! read) with the crate's message; a panic inside the crate becomes a `RuntimeError`, never an
//! abort. Long computations release the GIL, taking it back only to call a Python model.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use ddpm::diffusion::losses::{calc_bpd_loop, prior_bpd, vb_terms_bpd};
use ddpm::diffusion::samplers::{self, GridPoint, SamplerKind, TimestepSpacing};
use ddpm::diffusion::vectors::{
    compare, read_named_arrays, ReferenceVectors, Tolerance, VectorsConfig, TABLE_ENTRIES,
};
use ddpm::diffusion::{
    p_mean_variance, q_posterior_mean_variance, q_sample, BetaSchedule, Convention, MeanType, ModelOutput,
    NoiseSchedule, Parameterization, Table, VarianceType,
};
use ddpm::sample::SampleConfig;
use ndarray::{ArrayD, IxDyn};
use numpy::{AllowTypeChange, IntoPyArray, PyArray1, PyArrayDyn, PyArrayLike1, PyArrayLikeDyn, ToPyArray};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

mod arrays;
mod model;
mod sampling;
mod schedule;

use schedule::Schedule;

type Array<'py> = Bound<'py, PyArrayDyn<f64>>;

/// A crate error as the Python exception that fits it, with the crate's message.
fn py_err(e: ddpm::Error) -> PyErr {
    match e {
        ddpm::Error::Io { .. } => PyOSError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn value_err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Runs `f`, turning a panic into a `RuntimeError` (a bug in ddpm, never an abort of Python).
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("internal error in ddpm (please report it): {msg}")))
        }
    }
}

/// [`guarded`] with the GIL released.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<T> + Send) -> PyResult<T> {
    py.detach(|| guarded(f))
}

fn array_in(a: &PyArrayLikeDyn<'_, f64, AllowTypeChange>) -> ArrayD<f64> {
    a.as_array().to_owned()
}

/// A batch's timesteps: one per image, each a code index below T.
fn timesteps_in(t: &PyArrayLike1<'_, i64, AllowTypeChange>, n: usize, big_t: usize) -> PyResult<Vec<usize>> {
    let t: Vec<i64> = t.as_array().to_vec();
    if t.len() != n {
        return Err(value_err(format!(
            "t has {} entries for a batch of {n}; give one timestep per image",
            t.len()
        )));
    }
    t.iter()
        .map(|&ti| {
            usize::try_from(ti).ok().filter(|&u| u < big_t).ok_or_else(|| {
                value_err(format!(
                    "timestep {ti} is out of range: this schedule has T = {big_t} (0..={})",
                    big_t - 1
                ))
            })
        })
        .collect()
}

fn batch_of(x: &ArrayD<f64>, what: &str) -> PyResult<usize> {
    match x.shape().first() {
        Some(&n) if n > 0 => Ok(n),
        _ => Err(value_err(format!("{what} must be a batch [N, ...] with N ≥ 1, got shape {:?}", x.shape()))),
    }
}

fn same_shape(a: &ArrayD<f64>, b: &ArrayD<f64>, what: &str) -> PyResult<()> {
    if a.shape() != b.shape() {
        return Err(value_err(format!("{what}: shapes {:?} and {:?} differ", a.shape(), b.shape())));
    }
    Ok(())
}

fn mean_type(s: &str) -> PyResult<MeanType> {
    Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "eps" | "epsilon" => MeanType::Eps,
        "x0" | "xstart" | "start_x" => MeanType::X0,
        "v" => MeanType::V,
        "prev_x" | "xprev" | "previous_x" => MeanType::PrevX,
        _ => return Err(value_err(format!("mean_type {s:?}: expected eps, x0 (start_x), v or prev_x"))),
    })
}

fn var_type(s: &str) -> PyResult<VarianceType> {
    Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "fixedlarge" | "fixed_large" => VarianceType::FixedLarge,
        "fixedsmall" | "fixed_small" => VarianceType::FixedSmall,
        "learned" => VarianceType::Learned,
        "learned_range" | "learnedrange" => VarianceType::LearnedRange,
        _ => {
            return Err(value_err(format!(
                "var_type {s:?}: expected fixedlarge, fixedsmall, learned or learned_range"
            )))
        }
    })
}

/// A raw model output checked against x_t's shape (twice the channels for a learned variance)
/// and split into its halves.
fn checked_output(out: ArrayD<f64>, x_t: &ArrayD<f64>, var: VarianceType) -> PyResult<ModelOutput> {
    Ok(ModelOutput::split(checked_raw(out, x_t, var)?, var))
}

/// The shape of a raw model output for `x_t`: x_t's, with twice the channels for a learned
/// variance.
fn output_shape(x_t: &ArrayD<f64>, var: VarianceType) -> PyResult<Vec<usize>> {
    let mut want = x_t.shape().to_vec();
    if var.is_learned() {
        if want.len() < 2 {
            return Err(value_err("a learned variance needs a channel axis (shape [N, C, ...])"));
        }
        want[1] *= 2;
    }
    Ok(want)
}

/// A raw model output, checked to have [`output_shape`].
fn checked_raw(out: ArrayD<f64>, x_t: &ArrayD<f64>, var: VarianceType) -> PyResult<ArrayD<f64>> {
    let want = output_shape(x_t, var)?;
    if out.shape() != want.as_slice() {
        return Err(value_err(format!(
            "model output has shape {:?}; with x_t of shape {:?} and var_type {var:?} it must be {want:?}",
            out.shape(),
            x_t.shape()
        )));
    }
    Ok(out)
}

/// What the network predicts and how its variance is set, from their Python names.
fn parameterization(mean: &str, var: &str) -> PyResult<Parameterization> {
    Ok(Parameterization { mean_type: mean_type(mean)?, variance_type: var_type(var)? })
}

/// The network timesteps of a batch as the array a model is given: int64 when every one is a
/// whole number, else float64.
fn timesteps_out<'py>(py: Python<'py>, t: &[f64]) -> Bound<'py, PyAny> {
    if t.iter().all(|v| v.fract() == 0.0 && v.abs() < 9.0e15) {
        t.iter().map(|&v| v as i64).collect::<Vec<_>>().into_pyarray(py).into_any()
    } else {
        t.to_vec().into_pyarray(py).into_any()
    }
}

/// Calls the Python `model(x_t, t)` and returns its output as float64.
fn call_model(model: &Py<PyAny>, x_t: &ArrayD<f64>, t: &[f64]) -> PyResult<ArrayD<f64>> {
    Python::attach(|py| {
        let x = x_t.to_pyarray(py);
        let out = model.bind(py).call1((x, timesteps_out(py, t)))?;
        let np = py.import("numpy")?;
        let not_array = |e: PyErr| {
            PyTypeError::new_err(format!(
                "the model returned something numpy cannot turn into a float64 array: {e}"
            ))
        };
        let arr = np.call_method1("asarray", (out, "float64")).map_err(not_array)?;
        let arr: PyArrayLikeDyn<'_, f64, AllowTypeChange> = arr.extract().map_err(not_array)?;
        Ok(arr.as_array().to_owned())
    })
}

/// Panics inside the native module, to check that a panic reaches Python as a RuntimeError
/// (python/tests/test_errors.py); not part of the API.
#[pyfunction]
fn _panic_for_tests() -> PyResult<()> {
    guarded(|| panic!("a deliberate panic"))
}

#[pymodule]
fn _ddpm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<schedule::Schedule>()?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Oracle>()?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(sampling::sample, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::vectors, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::compare_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
