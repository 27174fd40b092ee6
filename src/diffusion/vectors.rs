//! Reference vectors: the schedule tables and one seeded batch of every quantity, in float64,
//! under improved-diffusion's names, so another implementation can check itself against this one
//! (`ddpm vectors`), and the comparison of two such files (`ddpm compare`).
//!
//! docs/vectors.md documents every entry, its shape and its formula.

use std::path::Path;

use ndarray::{Array1, ArrayD};
use rand::Rng as _;

use super::convention::Conventions;
use super::gaussian::{
    p_mean_variance, predict_x0_from_eps, q_posterior_mean_variance, q_sample, standard_normal, MeanType,
    ModelOutput, Parameterization, VarianceType,
};
use super::losses::{prior_bpd, vb_terms_bpd};
use super::schedule::{BetaSchedule, NoiseSchedule, Table};
use crate::error::{Error, Result};
use crate::io::npz::{read_npz, write_npz, NpzArray};
use crate::rng_from_seed;

/// The schedule tables written, in file order, by their improved-diffusion names.
pub const TABLE_ENTRIES: [Table; 12] = [
    Table::Betas,
    Table::AlphaBar,
    Table::AlphaBarPrev,
    Table::SqrtAlphaBar,
    Table::SqrtOneMinusAlphaBar,
    Table::LogOneMinusAlphaBar,
    Table::SqrtRecipAlphaBar,
    Table::SqrtRecipm1AlphaBar,
    Table::BetaTilde,
    Table::LogBetaTildeClipped,
    Table::PosteriorMeanCoef1,
    Table::PosteriorMeanCoef2,
];

/// The per-case entries written after the tables, in file order.
pub const CASE_ENTRIES: [&str; 14] = [
    "x0",
    "t",
    "noise",
    "x_t",
    "model_output",
    "posterior_mean",
    "pred_xstart",
    "p_mean_fixedlarge",
    "p_log_variance_fixedlarge",
    "p_mean_fixedsmall",
    "p_log_variance_fixedsmall",
    "vb_bpd_fixedlarge",
    "vb_bpd_fixedsmall",
    "prior_bpd",
];

/// How the reference batch is built.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorsConfig {
    /// The β schedule.
    pub schedule: BetaSchedule,
    /// T.
    pub timesteps: usize,
    /// The conventions the tables and terms follow.
    pub conventions: Conventions,
    /// Seed of the batch's random draws.
    pub seed: u64,
    /// N, the number of cases (at least 4, so t can cover 0, 1, T/2 and T−1).
    pub batch: usize,
    /// The shape of one case, `[C, H, W]`.
    pub sample_shape: [usize; 3],
}

impl Default for VectorsConfig {
    /// Linear schedule, T = 1000, `ho2020`, seed 0, N = 8 cases of `[3, 4, 4]`.
    fn default() -> Self {
        VectorsConfig {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            conventions: Conventions::default(),
            seed: 0,
            batch: 8,
            sample_shape: [3, 4, 4],
        }
    }
}

/// The stand-in for the network's ε prediction: model_output = noise + 0.1·z with z ~ N(0, I)
/// drawn after the noise, so every term is non-trivial yet near its ideal value.
pub const MODEL_OUTPUT_SCALE: f64 = 0.1;

/// The reference batch and the tables, every array float64 except `t` (int64).
#[derive(Clone, Debug)]
pub struct ReferenceVectors {
    /// The schedule the tables come from.
    pub schedule: NoiseSchedule,
    /// x_0 on the 8-bit grid k/127.5 − 1, `[N, C, H, W]`.
    pub x0: ArrayD<f64>,
    /// Code indices (0-based), `[N]`: 0, 1, T/2, T−1, then uniform draws.
    pub t: Array1<i64>,
    /// ε ~ N(0, I), `[N, C, H, W]`.
    pub noise: ArrayD<f64>,
    /// x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Eq. 4), `[N, C, H, W]`.
    pub x_t: ArrayD<f64>,
    /// The stand-in ε prediction ([`MODEL_OUTPUT_SCALE`]), `[N, C, H, W]`.
    pub model_output: ArrayD<f64>,
    /// μ̃_t(x_t, x_0) (Eq. 7), `[N, C, H, W]`.
    pub posterior_mean: ArrayD<f64>,
    /// x̂_0 from the ε prediction, not clipped, `[N, C, H, W]`.
    pub pred_xstart: ArrayD<f64>,
    /// μ_θ with σ_t² = β_t (equal to the fixed-small mean: the mean does not depend on σ), `[N, C, H, W]`.
    pub p_mean_fixedlarge: ArrayD<f64>,
    /// log σ_t² for σ_t² = β_t (first step per the convention), broadcast to `[N, C, H, W]`.
    pub p_log_variance_fixedlarge: ArrayD<f64>,
    /// μ_θ with σ_t² = β̃_t, `[N, C, H, W]`.
    pub p_mean_fixedsmall: ArrayD<f64>,
    /// log β̃_t clipped per the convention, broadcast to `[N, C, H, W]`.
    pub p_log_variance_fixedsmall: ArrayD<f64>,
    /// The bound's term at each case's t in bits/dim (decoder NLL where t = 0, KL elsewhere), σ² = β, `[N]`.
    pub vb_bpd_fixedlarge: Array1<f64>,
    /// As `vb_bpd_fixedlarge` with σ² = β̃, `[N]`.
    pub vb_bpd_fixedsmall: Array1<f64>,
    /// L_T in bits/dim, `[N]`.
    pub prior_bpd: Array1<f64>,
}

impl ReferenceVectors {
    /// Builds the tables and the seeded batch.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the batch has fewer than 4 cases or a zero dimension, and the
    /// schedule's errors ([`NoiseSchedule::new`]).
    pub fn build(config: &VectorsConfig) -> Result<Self> {
        if config.batch < 4 {
            return Err(Error::config(
                "batch",
                format!("{} cases; at least 4 are needed to cover t = 0, 1, T/2 and T−1", config.batch),
            ));
        }
        if config.sample_shape.contains(&0) {
            return Err(Error::config(
                "sample shape",
                format!("{:?} has a zero dimension", config.sample_shape),
            ));
        }
        // Fourteen arrays of the batch's size.
        let [c, h, w] = config.sample_shape;
        crate::files::check_array_size(
            "reference batch (--batch, --shape)",
            &[config.batch, c, h, w],
            8,
            14,
        )?;
        let schedule = NoiseSchedule::new(&config.schedule, config.timesteps, config.conventions)?;
        let big_t = schedule.num_timesteps();
        let n = config.batch;
        let shape = [n, c, h, w];
        let mut rng = rng_from_seed(config.seed);

        // Draw order (fixed): x0 pixels, the extra timesteps, the noise, the stand-in's z.
        let x0 = ArrayD::from_shape_simple_fn(&shape[..], || {
            f64::from(rng.random_range(0..=255u32)) / 127.5 - 1.0
        });
        let mut t_usize = vec![0, 1, big_t / 2, big_t - 1];
        t_usize.extend((4..n).map(|_| rng.random_range(0..big_t)));
        let noise = standard_normal(&shape, &mut rng);
        let z = standard_normal(&shape, &mut rng);
        let model_output = &noise + &(z * MODEL_OUTPUT_SCALE);

        let t = &t_usize[..];
        let x_t = q_sample(&schedule, &x0, t, &noise);
        let posterior_mean = q_posterior_mean_variance(&schedule, &x0, &x_t, t).mean;
        let pred_xstart = predict_x0_from_eps(&schedule, &x_t, t, &model_output);
        let output = ModelOutput { prediction: model_output.clone(), variance_values: None };
        let large = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedLarge };
        let small = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedSmall };
        let p_large = p_mean_variance(&schedule, &large, &x_t, t, &output, false);
        let p_small = p_mean_variance(&schedule, &small, &x_t, t, &output, false);
        let vb_bpd_fixedlarge = vb_terms_bpd(&schedule, &large, &x0, &x_t, t, &output, false).bpd;
        let vb_bpd_fixedsmall = vb_terms_bpd(&schedule, &small, &x0, &x_t, t, &output, false).bpd;
        let prior_bpd = prior_bpd(&schedule, &x0);

        Ok(ReferenceVectors {
            t: t_usize.iter().map(|&v| v as i64).collect(),
            schedule,
            x0,
            noise,
            x_t,
            model_output,
            posterior_mean,
            pred_xstart,
            p_mean_fixedlarge: p_large.mean,
            p_log_variance_fixedlarge: p_large.log_variance,
            p_mean_fixedsmall: p_small.mean,
            p_log_variance_fixedsmall: p_small.log_variance,
            vb_bpd_fixedlarge,
            vb_bpd_fixedsmall,
            prior_bpd,
        })
    }

    /// Writes every entry to an uncompressed `.npz` (tables first, then the cases, in the order of
    /// [`TABLE_ENTRIES`] and [`CASE_ENTRIES`]); `np.load(path)[name]` reads each back.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let mut arrays: Vec<(&str, NpzArray<'_>)> = TABLE_ENTRIES
            .iter()
            .map(|&table| {
                let name = table
                    .improved_diffusion_name()
                    .expect("TABLE_ENTRIES lists only tables with an improved-diffusion name");
                (name, self.schedule.table(table).view().into())
            })
            .collect();
        let cases: [(&str, NpzArray<'_>); 14] = [
            ("x0", self.x0.view().into()),
            ("t", self.t.view().into()),
            ("noise", self.noise.view().into()),
            ("x_t", self.x_t.view().into()),
            ("model_output", self.model_output.view().into()),
            ("posterior_mean", self.posterior_mean.view().into()),
            ("pred_xstart", self.pred_xstart.view().into()),
            ("p_mean_fixedlarge", self.p_mean_fixedlarge.view().into()),
            ("p_log_variance_fixedlarge", self.p_log_variance_fixedlarge.view().into()),
            ("p_mean_fixedsmall", self.p_mean_fixedsmall.view().into()),
            ("p_log_variance_fixedsmall", self.p_log_variance_fixedsmall.view().into()),
            ("vb_bpd_fixedlarge", self.vb_bpd_fixedlarge.view().into()),
            ("vb_bpd_fixedsmall", self.vb_bpd_fixedsmall.view().into()),
            ("prior_bpd", self.prior_bpd.view().into()),
        ];
        debug_assert!(cases.iter().map(|c| c.0).eq(CASE_ENTRIES));
        arrays.extend(cases);
        write_npz(path, &arrays)
    }
}

/// Tolerances of [`compare`]: an element passes when |cand − ref| ≤ atol + rtol·|ref|
/// (numpy's `isclose`); NaN matches only NaN, and an infinity only the same infinity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

impl Default for Tolerance {
    /// rtol 1e-5, atol 1e-8: float64 candidates pass with a wide margin (they agree to ~1e-12);
    /// float32 candidates need about `--rtol 1e-4 --atol 1e-5` (docs/vectors.md).
    fn default() -> Self {
        Tolerance { rtol: 1e-5, atol: 1e-8 }
    }
}

/// The verdict on one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryStatus {
    /// Same shape, every element within tolerance.
    Ok,
    /// Same shape, some element outside tolerance.
    Mismatch,
    /// The shapes differ.
    ShapeMismatch,
    /// In the reference only.
    MissingInCandidate,
    /// In the candidate only.
    MissingInReference,
}

impl EntryStatus {
    /// Whether the entry passes.
    pub fn passed(self) -> bool {
        match self {
            EntryStatus::Ok => true,
            EntryStatus::Mismatch
            | EntryStatus::ShapeMismatch
            | EntryStatus::MissingInCandidate
            | EntryStatus::MissingInReference => false,
        }
    }
}

/// The comparison of one named array.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryComparison {
    /// The array's name.
    pub name: String,
    /// Its shape in the reference, if there.
    pub reference_shape: Option<Vec<usize>>,
    /// Its shape in the candidate, if there.
    pub candidate_shape: Option<Vec<usize>>,
    /// max |cand − ref| over elements (shapes equal only; NaN where NaN meets a number).
    pub max_abs_err: Option<f64>,
    /// max |cand − ref|/|ref| over elements with ref ≠ 0 (0 if there is none).
    pub max_rel_err: Option<f64>,
    /// Elements outside tolerance.
    pub mismatched: usize,
    /// The verdict.
    pub status: EntryStatus,
}

/// The comparison of two sets of named arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct ComparisonReport {
    /// One row per name, reference order first, then names only the candidate has.
    pub entries: Vec<EntryComparison>,
    /// The tolerances used.
    pub tolerance: Tolerance,
}

impl ComparisonReport {
    /// Whether every entry passed.
    pub fn passed(&self) -> bool {
        self.entries.iter().all(|e| e.status.passed())
    }
}

impl ComparisonReport {
    /// The report as `ddpm compare` prints it: one aligned row per entry (name, both shapes,
    /// max abs/rel error, status).
    pub fn table(&self) -> String {
        let header = ["name", "shape ref", "shape cand", "max abs err", "max rel err", "status"];
        let rows: Vec<[String; 6]> = self
            .entries
            .iter()
            .map(|e| {
                [
                    e.name.clone(),
                    shape_cell(&e.reference_shape),
                    shape_cell(&e.candidate_shape),
                    number_cell(e.max_abs_err),
                    number_cell(e.max_rel_err),
                    e.status_text(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                // Numbers right-aligned, text left-aligned.
                if i == 3 || i == 4 {
                    s.push_str(&format!("{cell:>w$}"));
                } else if i == 5 {
                    s.push_str(cell);
                } else {
                    s.push_str(&format!("{cell:<w$}"));
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(header);
        out.push_str(&line(widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str)));
        for row in &rows {
            out.push_str(&line(row.each_ref().map(String::as_str)));
        }
        out
    }
}

impl EntryComparison {
    /// The status as the report's table writes it, e.g. `MISMATCH (3 elements)`.
    pub fn status_text(&self) -> String {
        match self.status {
            EntryStatus::Ok => "OK".to_string(),
            EntryStatus::Mismatch => format!("MISMATCH ({} elements)", self.mismatched),
            EntryStatus::ShapeMismatch => "MISMATCH (shape)".to_string(),
            EntryStatus::MissingInCandidate => "MISSING in candidate".to_string(),
            EntryStatus::MissingInReference => "MISSING in reference".to_string(),
        }
    }
}

fn shape_cell(s: &Option<Vec<usize>>) -> String {
    match s {
        Some(dims) => format!("{dims:?}"),
        None => "-".to_string(),
    }
}

fn number_cell(v: Option<f64>) -> String {
    match v {
        Some(x) => format!("{x:.3e}"),
        None => "-".to_string(),
    }
}

/// Compares `candidate` against `reference` (name, values) entry by entry; with `only`, just
/// those names (a name missing from both is reported as missing in the candidate).
pub fn compare(
    reference: &[(String, ArrayD<f64>)],
    candidate: &[(String, ArrayD<f64>)],
    tolerance: Tolerance,
    only: Option<&[String]>,
) -> ComparisonReport {
    let wanted = |name: &str| only.is_none_or(|names| names.iter().any(|n| n == name));
    let find = |set: &[(String, ArrayD<f64>)], name: &str| {
        set.iter().find(|(n, _)| n == name).map(|(_, a)| a.clone())
    };
    let mut names: Vec<String> = reference.iter().map(|(n, _)| n.clone()).filter(|n| wanted(n)).collect();
    for (n, _) in candidate {
        if wanted(n) && !names.contains(n) {
            names.push(n.clone());
        }
    }
    if let Some(only) = only {
        for n in only {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let entries = names
        .into_iter()
        .map(|name| {
            let r = find(reference, &name);
            let c = find(candidate, &name);
            compare_entry(name, r.as_ref(), c.as_ref(), tolerance)
        })
        .collect();
    ComparisonReport { entries, tolerance }
}

fn compare_entry(
    name: String,
    r: Option<&ArrayD<f64>>,
    c: Option<&ArrayD<f64>>,
    tol: Tolerance,
) -> EntryComparison {
    let reference_shape = r.map(|a| a.shape().to_vec());
    let candidate_shape = c.map(|a| a.shape().to_vec());
    let (r, c) = match (r, c) {
        (Some(r), Some(c)) if r.shape() == c.shape() => (r, c),
        (r, c) => {
            let status = match (r, c) {
                (Some(_), None) | (None, None) => EntryStatus::MissingInCandidate,
                (None, Some(_)) => EntryStatus::MissingInReference,
                (Some(_), Some(_)) => EntryStatus::ShapeMismatch,
            };
            return EntryComparison {
                name,
                reference_shape,
                candidate_shape,
                max_abs_err: None,
                max_rel_err: None,
                mismatched: 0,
                status,
            };
        }
    };
    let mut max_abs: f64 = 0.0;
    let mut max_rel: f64 = 0.0;
    let mut mismatched = 0;
    for (&rv, &cv) in r.iter().zip(c) {
        let same_special = (rv.is_nan() && cv.is_nan()) || (rv.is_infinite() && rv == cv);
        if same_special {
            continue;
        }
        let abs = (cv - rv).abs();
        // NaN compares false: a NaN difference is recorded as NaN and counted as a mismatch.
        max_abs = if abs.is_nan() || max_abs.is_nan() { f64::NAN } else { max_abs.max(abs) };
        if rv != 0.0 {
            let rel = abs / rv.abs();
            max_rel = if rel.is_nan() || max_rel.is_nan() { f64::NAN } else { max_rel.max(rel) };
        }
        let within = abs <= tol.atol + tol.rtol * rv.abs(); // false for NaN
        if !within {
            mismatched += 1;
        }
    }
    let status = if mismatched == 0 { EntryStatus::Ok } else { EntryStatus::Mismatch };
    EntryComparison {
        name,
        reference_shape,
        candidate_shape,
        max_abs_err: Some(max_abs),
        max_rel_err: Some(max_rel),
        mismatched,
        status,
    }
}

/// Reads every array of an `.npz` as (name, f64 values), in archive order.
///
/// # Errors
/// As [`crate::io::npz::read_npz`].
pub fn read_named_arrays(path: &Path) -> Result<Vec<(String, ArrayD<f64>)>> {
    Ok(read_npz(path)?.into_iter().map(|e| (e.name, e.values)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> VectorsConfig {
        VectorsConfig { timesteps: 50, batch: 6, sample_shape: [2, 2, 2], ..VectorsConfig::default() }
    }

    #[test]
    fn the_batch_covers_the_required_timesteps_and_is_reproducible() {
        let a = ReferenceVectors::build(&small()).expect("valid");
        assert_eq!(&a.t.to_vec()[..4], &[0, 1, 25, 49]);
        assert!(a
            .x0
            .iter()
            .all(|&v| ((v + 1.0) * 127.5 - ((v + 1.0) * 127.5).round()).abs() < 1e-9 && v.abs() <= 1.0));
        let b = ReferenceVectors::build(&small()).expect("valid");
        assert_eq!(a.model_output, b.model_output);
        assert_eq!(a.vb_bpd_fixedsmall, b.vb_bpd_fixedsmall);
        assert!(ReferenceVectors::build(&VectorsConfig { batch: 3, ..small() }).is_err());
    }

    #[test]
    fn compare_flags_values_shapes_and_missing_names() {
        let a = ArrayD::from_shape_vec(vec![3], vec![1.0, 0.0, f64::NAN]).expect("3");
        let reference =
            vec![("a".to_string(), a.clone()), ("b".to_string(), a.clone()), ("c".to_string(), a.clone())];
        let mut bumped = a.clone();
        bumped[0] = 1.0 + 1e-3;
        let candidate =
            vec![("a".to_string(), a.clone()), ("b".to_string(), bumped), ("d".to_string(), a.clone())];
        let r = compare(&reference, &candidate, Tolerance::default(), None);
        let status: Vec<_> = r.entries.iter().map(|e| (e.name.as_str(), e.status)).collect();
        assert_eq!(
            status,
            vec![
                ("a", EntryStatus::Ok),
                ("b", EntryStatus::Mismatch),
                ("c", EntryStatus::MissingInCandidate),
                ("d", EntryStatus::MissingInReference)
            ]
        );
        assert!((r.entries[1].max_abs_err.expect("compared") - 1e-3).abs() < 1e-12);
        assert!(!r.passed());
        let only = compare(&reference, &candidate, Tolerance::default(), Some(&["a".to_string()]));
        assert!(only.passed() && only.entries.len() == 1);
        let shape = compare(
            &reference[..1],
            &[("a".to_string(), ArrayD::zeros(vec![1, 3]))],
            Tolerance::default(),
            None,
        );
        assert_eq!(shape.entries[0].status, EntryStatus::ShapeMismatch);
    }
}
