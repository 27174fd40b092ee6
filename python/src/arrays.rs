//! `ddpm.vectors` and `ddpm.compare`: the reference arrays and their comparison.

use super::*;

/// The reference vectors `ddpm vectors` writes, built by the same code: a dict of the arrays
/// its .npz holds, by the same names (the tables, then the seeded batch and its terms). With
/// `path`, also written there as .npz.
#[pyfunction]
#[pyo3(signature = (kind = "linear", timesteps = 1000, convention = "ho2020", seed = 0, batch = 8,
    sample_shape = (3, 4, 4), path = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn vectors<'py>(
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
pub(crate) fn compare_arrays<'py>(
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
