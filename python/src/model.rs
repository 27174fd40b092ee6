//! `ddpm.load`, `ddpm.Model` and `ddpm.Oracle`: networks and the exact denoiser.

use super::*;

/// The exact denoiser of a finite data set: E[ε | x_t] when the data are exactly `images`
/// [K, ...] (a posterior-weighted average over the K points). With one point it returns the
/// true noise, so a bound computed with it is known in closed form.
#[pyclass(module = "ddpm", name = "Oracle", frozen)]
pub(crate) struct Oracle {
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
pub(crate) struct Model {
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
pub(crate) fn load(
    py: Python<'_>,
    path: PathBuf,
    no_ema: bool,
    flags: Option<String>,
    family: &str,
) -> PyResult<Model> {
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
