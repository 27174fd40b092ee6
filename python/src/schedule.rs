//! `ddpm.Schedule`: the tables and the diffusion's math, improved-diffusion's names.

use super::*;

/// The diffusion's schedule and every table derived from it, with improved-diffusion's names.
///
/// `Schedule(kind="linear", timesteps=1000, convention="ho2020")` builds β from a named schedule
/// (linear, cosine, quadratic, sigmoid, constant, or file:PATH of a .npy/.txt of β);
/// `Schedule(betas=array, convention=...)` takes β as given. `convention` picks how the details
/// the references disagree on are done: ho2020, improved-diffusion, guided-diffusion or
/// diffusers (docs/conventions.md).
#[pyclass(module = "ddpm", name = "Schedule", frozen)]
pub(crate) struct Schedule {
    pub(crate) inner: NoiseSchedule,
    pub(crate) convention: Convention,
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
        let param = parameterization(mean_type, var_type)?;
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
        let param = parameterization(mean_type, var_type)?;
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
        let param = parameterization(mean_type, var_type)?;
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
                if failed.is_none() {
                    let mt: Vec<f64> = t.iter().map(|&ti| s.model_timestep(ti)).collect();
                    match call_model(&model, x_t, &mt).and_then(|o| checked_raw(o, x_t, param.variance_type))
                    {
                        Ok(o) => return o,
                        Err(e) => failed = Some(e),
                    }
                }
                // Cannot fail: x_start was checked to have a channel axis for a learned variance.
                let want = output_shape(x_t, param.variance_type).expect("checked before the loop");
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
