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
    let mut want = x_t.shape().to_vec();
    if var.is_learned() {
        if want.len() < 2 {
            return Err(value_err("a learned variance needs a channel axis (shape [N, C, ...])"));
        }
        want[1] *= 2;
    }
    if out.shape() != want.as_slice() {
        return Err(value_err(format!(
            "model output has shape {:?}; with x_t of shape {:?} and var_type {var:?} it must be {want:?}",
            out.shape(),
            x_t.shape()
        )));
    }
    Ok(ModelOutput::split(out, var))
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

/// The diffusion's schedule and every table derived from it, with improved-diffusion's names.
///
/// `Schedule(kind="linear", timesteps=1000, convention="ho2020")` builds β from a named schedule
/// (linear, cosine, quadratic, sigmoid, constant, or file:PATH of a .npy/.txt of β);
/// `Schedule(betas=array, convention=...)` takes β as given. `convention` picks how the details
/// the references disagree on are done: ho2020, improved-diffusion, guided-diffusion or
/// diffusers (docs/conventions.md).
#[pyclass(module = "ddpm", name = "Schedule", frozen)]
struct Schedule {
    inner: NoiseSchedule,
    convention: Convention,
}

/// Every table's Python name and the table.
const TABLES: &[(&str, Table)] = &[
    ("betas", Table::Betas),
    ("alphas", Table::Alphas),
    ("alphas_cumprod", Table::AlphaBar),
    ("alphas_cumprod_prev", Table::AlphaBarPrev),
    ("sqrt_alphas_cumprod", Table::SqrtAlphaBar),
    ("sqrt_one_minus_alphas_cumprod", Table::SqrtOneMinusAlphaBar),
    ("log_one_minus_alphas_cumprod", Table::LogOneMinusAlphaBar),
    ("sqrt_recip_alphas_cumprod", Table::SqrtRecipAlphaBar),
    ("sqrt_recipm1_alphas_cumprod", Table::SqrtRecipm1AlphaBar),
    ("posterior_variance", Table::BetaTilde),
    ("posterior_log_variance_clipped", Table::LogBetaTildeClipped),
    ("posterior_mean_coef1", Table::PosteriorMeanCoef1),
    ("posterior_mean_coef2", Table::PosteriorMeanCoef2),
    ("log_betas", Table::LogBetas),
    ("fixed_large_log_variance", Table::FixedLargeLogVariance),
];

#[pymethods]
impl Schedule {
    /// β_t, shape [T].
    #[getter]
    fn betas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::Betas).to_pyarray(py)
    }

    /// α_t = 1 − β_t, shape [T].
    #[getter]
    fn alphas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::Alphas).to_pyarray(py)
    }

    /// ᾱ_t = Π α_s, shape [T].
    #[getter]
    fn alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::AlphaBar).to_pyarray(py)
    }

    /// ᾱ_{t−1} (1 at the first step), shape [T].
    #[getter]
    fn alphas_cumprod_prev<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::AlphaBarPrev).to_pyarray(py)
    }

    /// √ᾱ_t, shape [T].
    #[getter]
    fn sqrt_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::SqrtAlphaBar).to_pyarray(py)
    }

    /// √(1 − ᾱ_t), shape [T].
    #[getter]
    fn sqrt_one_minus_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::SqrtOneMinusAlphaBar).to_pyarray(py)
    }

    /// log(1 − ᾱ_t), shape [T].
    #[getter]
    fn log_one_minus_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::LogOneMinusAlphaBar).to_pyarray(py)
    }

    /// 1/√ᾱ_t, shape [T].
    #[getter]
    fn sqrt_recip_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::SqrtRecipAlphaBar).to_pyarray(py)
    }

    /// √(1/ᾱ_t − 1), shape [T].
    #[getter]
    fn sqrt_recipm1_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::SqrtRecipm1AlphaBar).to_pyarray(py)
    }

    /// β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) (Ho Eq. 7), shape [T].
    #[getter]
    fn posterior_variance<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::BetaTilde).to_pyarray(py)
    }

    /// log β̃_t with the first step clipped per the convention, shape [T].
    #[getter]
    fn posterior_log_variance_clipped<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::LogBetaTildeClipped).to_pyarray(py)
    }

    /// √ᾱ_{t−1} β_t/(1 − ᾱ_t), the x_0 coefficient of μ̃_t (Ho Eq. 7), shape [T].
    #[getter]
    fn posterior_mean_coef1<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::PosteriorMeanCoef1).to_pyarray(py)
    }

    /// √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), the x_t coefficient of μ̃_t (Ho Eq. 7), shape [T].
    #[getter]
    fn posterior_mean_coef2<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::PosteriorMeanCoef2).to_pyarray(py)
    }

    /// log β_t, shape [T].
    #[getter]
    fn log_betas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::LogBetas).to_pyarray(py)
    }

    /// log σ_t² for σ_t² = β_t, the first step per the convention, shape [T].
    #[getter]
    fn fixed_large_log_variance<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.table(Table::FixedLargeLogVariance).to_pyarray(py)
    }

    #[new]
    #[pyo3(signature = (kind = "linear", timesteps = None, convention = "ho2020", betas = None))]
    fn new(
        py: Python<'_>,
        kind: &str,
        timesteps: Option<usize>,
        convention: &str,
        betas: Option<PyArrayLike1<'_, f64, AllowTypeChange>>,
    ) -> PyResult<Self> {
        let convention: Convention = convention.parse().map_err(py_err)?;
        let settings = convention.settings();
        let inner = match betas {
            Some(b) => {
                let b = b.as_array().to_vec();
                if let Some(t) = timesteps.filter(|&t| t != b.len()) {
                    return Err(value_err(format!("timesteps={t} but betas has {} entries", b.len())));
                }
                detached(py, move || NoiseSchedule::from_betas(b, settings).map_err(py_err))?
            }
            None => {
                let kind: BetaSchedule = kind.parse().map_err(py_err)?;
                let t = timesteps.unwrap_or(1000);
                detached(py, move || NoiseSchedule::new(&kind, t, settings).map_err(py_err))?
            }
        };
        Ok(Schedule { inner, convention })
    }

    /// T, the number of diffusion steps.
    #[getter]
    fn num_timesteps(&self) -> usize {
        self.inner.num_timesteps()
    }

    /// The convention's name (ho2020, improved-diffusion, guided-diffusion, diffusers).
    #[getter]
    fn convention(&self) -> &'static str {
        self.convention.name()
    }

    /// Every table, by name, as a dict of float64 arrays of shape [T].
    fn tables<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, table) in TABLES {
            d.set_item(name, self.inner.table(*table).to_pyarray(py))?;
        }
        Ok(d)
    }

    /// The timestep the network is given for code indices `t` (the index itself, or t·1000/T
    /// where the convention rescales), float64.
    fn model_timesteps<'py>(
        &self,
        py: Python<'py>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let n = t.as_array().len();
        let t = timesteps_in(&t, n, self.inner.num_timesteps())?;
        Ok(t.iter().map(|&ti| self.inner.model_timestep(ti)).collect::<Vec<_>>().into_pyarray(py))
    }

    /// x_t = √ᾱ_t x_start + √(1 − ᾱ_t) noise (Ho Eq. 4).
    fn q_sample<'py>(
        &self,
        py: Python<'py>,
        x_start: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
        noise: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    ) -> PyResult<Array<'py>> {
        let (x0, eps) = (array_in(&x_start), array_in(&noise));
        let t = timesteps_in(&t, batch_of(&x0, "x_start")?, self.inner.num_timesteps())?;
        same_shape(&x0, &eps, "q_sample: x_start and noise")?;
        let s = &self.inner;
        Ok(detached(py, || Ok(q_sample(s, &x0, &t, &eps)))?.into_pyarray(py))
    }

    /// The posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Ho Eqs. 6–7): (mean, variance,
    /// log_variance), each of x_t's shape, as improved-diffusion's method returns them.
    fn q_posterior_mean_variance<'py>(
        &self,
        py: Python<'py>,
        x_start: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        x_t: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
    ) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
        let (x0, xt) = (array_in(&x_start), array_in(&x_t));
        same_shape(&x0, &xt, "q_posterior_mean_variance: x_start and x_t")?;
        let t = timesteps_in(&t, batch_of(&x0, "x_start")?, self.inner.num_timesteps())?;
        let s = &self.inner;
        let g = detached(py, || Ok(q_posterior_mean_variance(s, &x0, &xt, &t)))?;
        Ok((g.mean.into_pyarray(py), g.variance.into_pyarray(py), g.log_variance.into_pyarray(py)))
    }

    /// p_θ(x_{t−1} | x_t) from the network's raw output: a dict with `mean`, `variance`,
    /// `log_variance` and `pred_xstart` (improved-diffusion's `p_mean_variance`, given the
    /// output rather than the model). For a learned variance the output has 2C channels.
    #[pyo3(signature = (model_output, x_t, t, mean_type = "eps", var_type = "fixedlarge", clip_denoised = true))]
    #[allow(clippy::too_many_arguments)]
    fn p_mean_variance<'py>(
        &self,
        py: Python<'py>,
        model_output: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        x_t: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
        mean_type: &str,
        var_type: &str,
        clip_denoised: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let param = Parameterization {
            mean_type: self::mean_type(mean_type)?,
            variance_type: self::var_type(var_type)?,
        };
        let xt = array_in(&x_t);
        let t = timesteps_in(&t, batch_of(&xt, "x_t")?, self.inner.num_timesteps())?;
        let out = checked_output(array_in(&model_output), &xt, param.variance_type)?;
        let s = &self.inner;
        let p = detached(py, || Ok(p_mean_variance(s, &param, &xt, &t, &out, clip_denoised)))?;
        let d = PyDict::new(py);
        d.set_item("mean", p.mean.into_pyarray(py))?;
        d.set_item("variance", p.variance.into_pyarray(py))?;
        d.set_item("log_variance", p.log_variance.into_pyarray(py))?;
        d.set_item("pred_xstart", p.x0_pred.into_pyarray(py))?;
        Ok(d)
    }

    /// One term of the variational bound in bits/dim (Ho Eq. 5): the KL L_{t−1} where t > 0,
    /// the discretised decoder's NLL L_0 where t = 0. A dict: `output` (the term, [N]),
    /// `kl`, `decoder_nll` (both [N]) and `pred_xstart`. x_start must be on the 8-bit grid in
    /// [−1, 1].
    #[pyo3(signature = (model_output, x_start, x_t, t, mean_type = "eps", var_type = "fixedlarge", clip_denoised = true))]
    #[allow(clippy::too_many_arguments)]
    fn vb_terms_bpd<'py>(
        &self,
        py: Python<'py>,
        model_output: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        x_start: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        x_t: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
        mean_type: &str,
        var_type: &str,
        clip_denoised: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let param = Parameterization {
            mean_type: self::mean_type(mean_type)?,
            variance_type: self::var_type(var_type)?,
        };
        let (x0, xt) = (array_in(&x_start), array_in(&x_t));
        same_shape(&x0, &xt, "vb_terms_bpd: x_start and x_t")?;
        let t = timesteps_in(&t, batch_of(&xt, "x_t")?, self.inner.num_timesteps())?;
        let out = checked_output(array_in(&model_output), &xt, param.variance_type)?;
        let s = &self.inner;
        let vb = detached(py, || Ok(vb_terms_bpd(s, &param, &x0, &xt, &t, &out, clip_denoised)))?;
        let d = PyDict::new(py);
        d.set_item("output", vb.bpd.into_pyarray(py))?;
        d.set_item("kl", vb.kl_bpd.into_pyarray(py))?;
        d.set_item("decoder_nll", vb.decoder_nll_bpd.into_pyarray(py))?;
        d.set_item("pred_xstart", vb.x0_pred.into_pyarray(py))?;
        Ok(d)
    }

    /// L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, shape [N].
    fn prior_bpd<'py>(
        &self,
        py: Python<'py>,
        x_start: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let x0 = array_in(&x_start);
        batch_of(&x0, "x_start")?;
        let s = &self.inner;
        Ok(detached(py, || Ok(prior_bpd(s, &x0)))?.into_pyarray(py))
    }

    /// The whole bound of a batch under `model` (improved-diffusion's `calc_bpd_loop`): for
    /// t = T−1 … 0, ε from the seeded stream (the one `ddpm eval --seed` gives its first
    /// batch), x_t by Eq. 4, `model(x_t, t)`, the term. A dict: `total_bpd`, `prior_bpd` ([N]),
    /// `vb`, `xstart_mse`, `mse` ([N, T], column t for code index t).
    #[pyo3(signature = (model, x_start, mean_type = "eps", var_type = "fixedlarge", clip_denoised = true, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn calc_bpd_loop<'py>(
        &self,
        py: Python<'py>,
        model: Py<PyAny>,
        x_start: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        mean_type: &str,
        var_type: &str,
        clip_denoised: bool,
        seed: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let param = Parameterization {
            mean_type: self::mean_type(mean_type)?,
            variance_type: self::var_type(var_type)?,
        };
        let x0 = array_in(&x_start);
        batch_of(&x0, "x_start")?;
        if param.variance_type.is_learned() && x0.ndim() < 2 {
            return Err(value_err("a learned variance needs a channel axis (shape [N, C, ...])"));
        }
        let s = &self.inner;
        let r = detached(py, || {
            // The first error of the model stops its calls; the loop runs out on zeros and the
            // error is raised.
            let mut failed: Option<PyErr> = None;
            let m = |x_t: &ArrayD<f64>, t: &[usize]| -> ArrayD<f64> {
                let mut want = x_t.shape().to_vec();
                if param.variance_type.is_learned() {
                    want[1] *= 2;
                }
                if failed.is_none() {
                    let mt: Vec<f64> = t.iter().map(|&ti| s.model_timestep(ti)).collect();
                    match call_model(&model, x_t, &mt)
                        .and_then(|o| checked_output(o, x_t, param.variance_type))
                    {
                        Ok(o) => {
                            return match o.variance_values {
                                None => o.prediction,
                                Some(v) => {
                                    ndarray::concatenate(ndarray::Axis(1), &[o.prediction.view(), v.view()])
                                        .expect("halves of one output")
                                }
                            }
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                ArrayD::zeros(IxDyn(&want))
            };
            let mut rng = ddpm::rng_from_seed(seed);
            let r = calc_bpd_loop(s, &param, &x0, clip_denoised, m, &mut rng);
            match failed {
                Some(e) => Err(e),
                None => Ok(r),
            }
        })?;
        let d = PyDict::new(py);
        d.set_item("total_bpd", r.total_bpd.into_pyarray(py))?;
        d.set_item("prior_bpd", r.prior_bpd.into_pyarray(py))?;
        d.set_item("vb", r.terms_bpd.into_pyarray(py))?;
        d.set_item("xstart_mse", r.x0_mse.into_pyarray(py))?;
        d.set_item("mse", r.eps_mse.into_pyarray(py))?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Schedule(T={}, convention={:?})", self.inner.num_timesteps(), self.convention.name())
    }
}

/// Draws `shape` images with one of ddpm's samplers driven by `model(x_t, t)`.
///
/// sampler: ancestral (Ho et al. Algorithm 2; also `ddpm`), ddim, pndm, plms, dpm-solver-1|2|3,
/// dpm-solver-2m|3m, dpm++2s, dpm++2m, dpm++3m, dpm++2m-sde, euler, heun, euler-ancestral.
/// steps: grid points (default: all T for ancestral, else 25); karras: the Karras σ grid.
/// x_T and every noise come from the seeded stream, as `ddpm sample --seed` draws them.
/// With trace=True a dict of every intermediate, named as `ddpm trace` writes them.
#[pyfunction]
#[pyo3(signature = (model, shape, schedule, sampler = "ancestral", steps = None, eta = 0.0, seed = 0,
    trace = false, mean_type = "eps", var_type = "fixedlarge", clip_denoised = true, karras = false,
    spacing = "linspace"))]
#[allow(clippy::too_many_arguments)]
fn sample<'py>(
    py: Python<'py>,
    model: Py<PyAny>,
    shape: Vec<usize>,
    schedule: &Schedule,
    sampler: &str,
    steps: Option<usize>,
    eta: f64,
    seed: u64,
    trace: bool,
    mean_type: &str,
    var_type: &str,
    clip_denoised: bool,
    karras: bool,
    spacing: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let param =
        Parameterization { mean_type: self::mean_type(mean_type)?, variance_type: self::var_type(var_type)? };
    let kind: SamplerKind = sampler.parse().map_err(py_err)?;
    if shape.is_empty() || shape.contains(&0) {
        return Err(value_err(format!("shape {shape:?}: give [N, C, H, W] with every dimension ≥ 1")));
    }
    if param.variance_type.is_learned() && shape.len() < 2 {
        return Err(value_err("a learned variance needs a channel axis (shape [N, C, ...])"));
    }
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(value_err(format!("eta must be a finite number ≥ 0, got {eta}")));
    }
    if eta != 0.0 && kind != SamplerKind::Ddim {
        return Err(value_err(format!("eta applies to the ddim sampler; {} has none", kind.name())));
    }
    let s = &schedule.inner;
    let mut config = SampleConfig::ancestral();
    config.sampler = kind;
    config.steps = Some(steps.unwrap_or(kind.default_steps(s.num_timesteps())));
    config.karras = karras;
    config.spacing = match spacing {
        "linspace" => TimestepSpacing::Linspace,
        "leading" => TimestepSpacing::Leading,
        "trailing" => TimestepSpacing::Trailing,
        _ => return Err(value_err(format!("spacing {spacing:?}: expected linspace, leading or trailing"))),
    };
    config.options.eta = eta;
    config.options.clip_x0 = clip_denoised;
    let alpha_bar = s.alpha_bar().to_vec();
    let (x_start, x0, steps) = detached(py, move || {
        let mut rng = ddpm::rng_from_seed(seed);
        let mut solver = ddpm::sample::start(s, &param, &shape, &config, &mut rng).map_err(py_err)?;
        let x_start = solver.x().clone();
        let mut kept: Vec<(String, ArrayD<f64>)> = vec![];
        let mut failed: Option<PyErr> = None;
        let model_fn = |x: &ArrayD<f64>, at: &GridPoint| -> ddpm::Result<ModelOutput> {
            let t = vec![at.model_t; x.shape()[0]];
            match call_model(&model, x, &t).and_then(|o| checked_output(o, x, param.variance_type)) {
                Ok(o) => Ok(o),
                Err(e) => {
                    failed = Some(e);
                    Err(ddpm::Error::Interrupted)
                }
            }
        };
        let on_eval = |i: usize,
                       x_in: &ArrayD<f64>,
                       at: &GridPoint,
                       out: &ModelOutput,
                       adv: &samplers::Advance,
                       x: &ArrayD<f64>|
         -> ddpm::Result<()> {
            if !trace {
                return Ok(());
            }
            let index = alpha_bar.iter().position(|&a| a == at.alpha_bar());
            let prefix = match (kind, index) {
                (SamplerKind::Ancestral, Some(t)) => format!("t{t:04}"),
                _ => format!("e{i:04}"),
            };
            let raw = match &out.variance_values {
                None => out.prediction.clone(),
                Some(v) => ndarray::concatenate(ndarray::Axis(1), &[out.prediction.view(), v.view()])
                    .expect("halves of one output"),
            };
            let mut push = |name: &str, a: &ArrayD<f64>| kept.push((format!("{prefix}.{name}"), a.clone()));
            push("x_t", x_in);
            push("eps", &raw);
            push("x0_pred", &adv.x0_pred);
            if kind == SamplerKind::Ancestral {
                if let Some(a) = &adv.ancestral {
                    push("mean", &a.mean);
                    push("variance", &a.variance);
                }
                if let Some(z) = &adv.noise {
                    push("noise", z);
                }
                push("x_prev", x);
            } else {
                push("eps_pred", &adv.eps_pred);
                push("x_next", x);
                if let Some(z) = &adv.noise {
                    push("noise", z);
                }
            }
            Ok(())
        };
        let r = samplers::run(solver.as_mut(), &mut rng, model_fn, on_eval);
        match (r, failed) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(py_err(e)),
            (Ok(x0), None) => Ok((x_start, x0, kept)),
        }
    })?;
    if !trace {
        return Ok(x0.into_pyarray(py).into_any());
    }
    let d = PyDict::new(py);
    d.set_item("x_T", x_start.into_pyarray(py))?;
    d.set_item("x_0", x0.into_pyarray(py))?;
    for (name, a) in steps {
        d.set_item(name, a.into_pyarray(py))?;
    }
    Ok(d.into_any())
}

/// The reference vectors `ddpm vectors` writes, built by the same code: a dict of the arrays
/// its .npz holds, by the same names (the tables, then the seeded batch and its terms). With
/// `path`, also written there as .npz.
#[pyfunction]
#[pyo3(signature = (kind = "linear", timesteps = 1000, convention = "ho2020", seed = 0, batch = 8,
    sample_shape = (3, 4, 4), path = None))]
#[allow(clippy::too_many_arguments)]
fn vectors<'py>(
    py: Python<'py>,
    kind: &str,
    timesteps: usize,
    convention: &str,
    seed: u64,
    batch: usize,
    sample_shape: (usize, usize, usize),
    path: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let convention: Convention = convention.parse().map_err(py_err)?;
    let config = VectorsConfig {
        schedule: kind.parse().map_err(py_err)?,
        timesteps,
        conventions: convention.settings(),
        seed,
        batch,
        sample_shape: [sample_shape.0, sample_shape.1, sample_shape.2],
    };
    let v = detached(py, || {
        let v = ReferenceVectors::build(&config).map_err(py_err)?;
        if let Some(p) = &path {
            v.write_npz(p).map_err(py_err)?;
        }
        Ok(v)
    })?;
    let d = PyDict::new(py);
    for table in TABLE_ENTRIES {
        let name = table.improved_diffusion_name().expect("the written tables have improved-diffusion names");
        d.set_item(name, v.schedule.table(table).to_pyarray(py))?;
    }
    d.set_item("x0", v.x0.into_pyarray(py))?;
    d.set_item("t", v.t.into_pyarray(py))?;
    d.set_item("noise", v.noise.into_pyarray(py))?;
    d.set_item("x_t", v.x_t.into_pyarray(py))?;
    d.set_item("model_output", v.model_output.into_pyarray(py))?;
    d.set_item("posterior_mean", v.posterior_mean.into_pyarray(py))?;
    d.set_item("pred_xstart", v.pred_xstart.into_pyarray(py))?;
    d.set_item("p_mean_fixedlarge", v.p_mean_fixedlarge.into_pyarray(py))?;
    d.set_item("p_log_variance_fixedlarge", v.p_log_variance_fixedlarge.into_pyarray(py))?;
    d.set_item("p_mean_fixedsmall", v.p_mean_fixedsmall.into_pyarray(py))?;
    d.set_item("p_log_variance_fixedsmall", v.p_log_variance_fixedsmall.into_pyarray(py))?;
    d.set_item("vb_bpd_fixedlarge", v.vb_bpd_fixedlarge.into_pyarray(py))?;
    d.set_item("vb_bpd_fixedsmall", v.vb_bpd_fixedsmall.into_pyarray(py))?;
    d.set_item("prior_bpd", v.prior_bpd.into_pyarray(py))?;
    Ok(d)
}

/// Named float64 arrays from a dict of arrays or a .npz/.npy path.
fn named_arrays(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<(String, ArrayD<f64>)>> {
    if let Ok(path) = obj.extract::<PathBuf>() {
        return read_named_arrays(&path).map_err(py_err);
    }
    let d = obj
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err(format!("{what}: give a dict of arrays or a .npz path")))?;
    let np = obj.py().import("numpy")?;
    let mut out = vec![];
    for (k, v) in d.iter() {
        let name: String =
            k.extract().map_err(|_| PyTypeError::new_err(format!("{what}: keys must be strings")))?;
        let arr = np.call_method1("asarray", (v, "float64"))?;
        let arr: PyArrayLikeDyn<'_, f64, AllowTypeChange> = arr.extract()?;
        out.push((name, arr.as_array().to_owned()));
    }
    Ok(out)
}

/// Compares `candidate` against `reference` (dicts of arrays or .npz paths) entry by entry, as
/// `ddpm compare` does: an element passes when |cand − ref| ≤ atol + rtol·|ref|. Returns a dict:
/// `passed`, `entries` (one dict per name: name, status, reference_shape, candidate_shape,
/// max_abs_err, max_rel_err, mismatched) and `table` (the text `ddpm compare` prints).
#[pyfunction]
#[pyo3(signature = (reference, candidate, rtol = 1e-5, atol = 1e-8, only = None))]
fn compare_arrays<'py>(
    py: Python<'py>,
    reference: &Bound<'py, PyAny>,
    candidate: &Bound<'py, PyAny>,
    rtol: f64,
    atol: f64,
    only: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    if !(rtol.is_finite() && rtol >= 0.0 && atol.is_finite() && atol >= 0.0) {
        return Err(value_err(format!("rtol and atol must be finite numbers ≥ 0, got {rtol} and {atol}")));
    }
    let (r, c) = (named_arrays(reference, "reference")?, named_arrays(candidate, "candidate")?);
    if r.is_empty() {
        return Err(value_err("the reference holds no arrays, so nothing would be compared"));
    }
    let report = detached(py, || Ok(compare(&r, &c, Tolerance { rtol, atol }, only.as_deref())))?;
    let entries = PyList::empty(py);
    for e in &report.entries {
        let d = PyDict::new(py);
        d.set_item("name", &e.name)?;
        d.set_item("status", e.status_text())?;
        d.set_item("passed", e.status.passed())?;
        d.set_item("reference_shape", e.reference_shape.clone())?;
        d.set_item("candidate_shape", e.candidate_shape.clone())?;
        d.set_item("max_abs_err", e.max_abs_err)?;
        d.set_item("max_rel_err", e.max_rel_err)?;
        d.set_item("mismatched", e.mismatched)?;
        entries.append(d)?;
    }
    let d = PyDict::new(py);
    d.set_item("passed", report.passed())?;
    d.set_item("entries", entries)?;
    d.set_item("table", report.table())?;
    Ok(d)
}

/// The exact denoiser of a finite data set: E[ε | x_t] when the data are exactly `images`
/// [K, ...] (a posterior-weighted average over the K points). With one point it returns the
/// true noise, so a bound computed with it is known in closed form.
#[pyclass(module = "ddpm", name = "Oracle", frozen)]
struct Oracle {
    inner: ddpm::diffusion::OracleDenoiser,
}

#[pymethods]
impl Oracle {
    #[new]
    fn new(images: PyArrayLikeDyn<'_, f64, AllowTypeChange>) -> PyResult<Self> {
        let images = array_in(&images);
        batch_of(&images, "images")?;
        Ok(Oracle { inner: ddpm::diffusion::OracleDenoiser::new(&images) })
    }

    /// E[ε | x_t] under `schedule` at code indices `t`, x_t's shape.
    fn eps<'py>(
        &self,
        py: Python<'py>,
        schedule: &Schedule,
        x_t: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, i64, AllowTypeChange>,
    ) -> PyResult<Array<'py>> {
        let xt = array_in(&x_t);
        let t = timesteps_in(&t, batch_of(&xt, "x_t")?, schedule.inner.num_timesteps())?;
        if xt.len() / xt.shape()[0] != self.inner.dim() {
            return Err(value_err(format!(
                "x_t has {} values per image; the oracle's points have {}",
                xt.len() / xt.shape()[0],
                self.inner.dim()
            )));
        }
        let (o, s) = (&self.inner, &schedule.inner);
        Ok(detached(py, || Ok(o.eps_pred(s, &xt, &t)))?.into_pyarray(py))
    }
}

/// Panics inside the native module, to check that a panic reaches Python as a RuntimeError
/// (python/tests/test_errors.py); not part of the API.
#[pyfunction]
fn _panic_for_tests() -> PyResult<()> {
    guarded(|| panic!("a deliberate panic"))
}

/// A `Send` wrapper for a model that only its creating thread touches: the class is
/// `unsendable`, so PyO3 refuses any other thread, and the GIL is released on that same thread.
struct OwnThread<T>(T);
// SAFETY: see the type's documentation: the value never leaves the thread that made it.
unsafe impl<T> Send for OwnThread<T> {}
unsafe impl<T> Sync for OwnThread<T> {}

/// A network loaded by `ddpm.load`: a ddpm checkpoint or run directory, or a diffusers folder.
/// Call it (or `.predict`) as `model(x_t, t)` with the network's timesteps; `.config` is its
/// configuration, `.schedule()` its diffusion's schedule.
#[pyclass(module = "ddpm", name = "Model", unsendable)]
struct Model {
    inner: OwnThread<ddpm::interop::LoadedModel>,
    path: PathBuf,
}

#[pymethods]
impl Model {
    /// The raw network output for images `x` [N, C, H, W] at network timesteps `t` [N]
    /// (computed in float32, as ddpm runs its networks; returned as float64); `y`, one class
    /// label per image, for a class-conditional model.
    #[pyo3(signature = (x, t, y = None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, f64, AllowTypeChange>,
        y: Option<PyArrayLike1<'py, i64, AllowTypeChange>>,
    ) -> PyResult<Array<'py>> {
        let x = array_in(&x);
        let t: Vec<f64> = t.as_array().to_vec();
        let m = &self.inner;
        let c = &m.0.net.config;
        let want = [c.in_channels, c.resolution, c.resolution];
        if x.ndim() != 4 || x.shape()[1..] != want || x.shape()[0] == 0 {
            return Err(value_err(format!(
                "x has shape {:?}; this model takes [N, {}, {}, {}] with N ≥ 1",
                x.shape(),
                want[0],
                want[1],
                want[2]
            )));
        }
        if t.len() != x.shape()[0] || t.iter().any(|v| !v.is_finite()) {
            return Err(value_err(format!("t must hold {} finite timesteps, one per image", x.shape()[0])));
        }
        let labels: Option<Vec<usize>> = match (c.num_classes, y) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(value_err("this model is not class-conditional; give no labels (y)"))
            }
            (Some(k), None) => {
                return Err(value_err(format!(
                    "this model is conditioned on {k} classes: give one label per image (y)"
                )))
            }
            (Some(k), Some(y)) => {
                let y = y.as_array().to_vec();
                if y.len() != x.shape()[0] {
                    return Err(value_err(format!("y has {} labels for {} images", y.len(), x.shape()[0])));
                }
                let label = |l: i64| {
                    usize::try_from(l)
                        .ok()
                        .filter(|&u| u < k)
                        .ok_or_else(|| value_err(format!("label {l} is not one of the model's {k} classes")))
                };
                Some(y.into_iter().map(label).collect::<PyResult<_>>()?)
            }
        };
        let out = detached(py, || {
            let m = &m.0;
            let bound = m.params.bind_constant();
            let mt: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            let x = ddpm::Var::constant(x.mapv(|v| v as f32));
            let y = m.net.forward_labelled(&bound, &x, &mt, labels.as_deref(), None);
            Ok(y.value().mapv(f64::from))
        })?;
        Ok(out.into_pyarray(py))
    }

    #[pyo3(signature = (x, t, y = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: PyArrayLikeDyn<'py, f64, AllowTypeChange>,
        t: PyArrayLike1<'py, f64, AllowTypeChange>,
        y: Option<PyArrayLike1<'py, i64, AllowTypeChange>>,
    ) -> PyResult<Array<'py>> {
        self.predict(py, x, t, y)
    }

    /// The network's and the diffusion's configuration, as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let m = &self.inner.0;
        let v = serde_json::json!({
            "unet": m.net.config,
            "diffusion": m.diffusion,
            "clip_denoised": m.clip_x0,
        });
        py.import("json")?.call_method1("loads", (v.to_string(),))
    }

    /// The diffusion's schedule (its β and convention).
    fn schedule(&self, py: Python<'_>) -> PyResult<Schedule> {
        let d = self.inner.0.diffusion.clone();
        let inner = detached(py, move || d.schedule().map_err(py_err))?;
        Ok(Schedule { inner, convention: self.inner.0.diffusion.convention })
    }

    /// What the network predicts (eps, x0, v, prev_x) and how its variance is set.
    #[getter]
    fn mean_type(&self) -> String {
        serde_json::to_value(self.inner.0.diffusion.mean_type)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// How the variance is set (fixed-large, fixed-small, learned, learned-range).
    #[getter]
    fn var_type(&self) -> String {
        serde_json::to_value(self.inner.0.diffusion.variance_type)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    fn __repr__(&self) -> String {
        format!("Model({:?})", self.path.display().to_string())
    }
}

/// Loads a model: a ddpm checkpoint file or run directory (EMA weights unless no_ema), a
/// diffusers folder (config.json and weights, or unet/ and scheduler/), or, given `flags` (the
/// flags of their scripts), an improved-diffusion or guided-diffusion `.pt` (`family`).
#[pyfunction]
#[pyo3(signature = (path, no_ema = false, flags = None, family = "improved-diffusion"))]
fn load(py: Python<'_>, path: PathBuf, no_ema: bool, flags: Option<String>, family: &str) -> PyResult<Model> {
    use ddpm::interop::openai::Family;
    let family = match family {
        "improved-diffusion" | "improved_diffusion" => Family::Improved,
        "guided-diffusion" | "guided_diffusion" => Family::Guided,
        _ => {
            return Err(value_err(format!(
                "family {family:?}: expected improved-diffusion or guided-diffusion"
            )))
        }
    };
    let p = path.clone();
    let m = py.detach(move || {
        guarded(|| {
            match &flags {
                Some(f) => ddpm::interop::load_openai(&p, f, family),
                None => ddpm::interop::load_model(&p, no_ema),
            }
            .map(OwnThread)
            .map_err(py_err)
        })
    })?;
    Ok(Model { inner: m, path })
}

#[pymodule]
fn _ddpm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Schedule>()?;
    m.add_class::<Model>()?;
    m.add_class::<Oracle>()?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(vectors, m)?)?;
    m.add_function(wrap_pyfunction!(compare_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
