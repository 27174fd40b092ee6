//! `ddpm.sample`: ddpm's samplers driven by a Python model.

use super::*;

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
pub(crate) fn sample<'py>(
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
    let param = parameterization(mean_type, var_type)?;
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
            let raw = out.joined()?;
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
