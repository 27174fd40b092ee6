//! Noise schedules β_t and every table derived from them, in f64, computed once.
//!
//! Code index `i` (0 … T−1) is the paper's step t = i + 1 (see the [module docs](super)).
//!
//! | code (`NoiseSchedule::…`)   | improved-diffusion name          | paper                                           |
//! |-----------------------------|----------------------------------|-------------------------------------------------|
//! | `betas()[i]`                | `betas`                          | β_t, forward variance, Ho Eq. (2)               |
//! | `alphas()[i]`               | `alphas`                         | α_t = 1 − β_t, Ho §2 (above Eq. 4)              |
//! | `alpha_bar()[i]`            | `alphas_cumprod`                 | ᾱ_t = ∏_{s≤t} α_s, Ho §2 (above Eq. 4)          |
//! | `alpha_bar_prev()[i]`       | `alphas_cumprod_prev`            | ᾱ_{t−1}, with ᾱ_0 = 1                           |
//! | `sqrt_alpha_bar()[i]`       | `sqrt_alphas_cumprod`            | √ᾱ_t, mean of q(x_t ∣ x_0), Eq. (4)             |
//! | `sqrt_one_minus_alpha_bar()`| `sqrt_one_minus_alphas_cumprod`  | √(1−ᾱ_t), std of q(x_t ∣ x_0), Eq. (4)          |
//! | `log_one_minus_alpha_bar()` | `log_one_minus_alphas_cumprod`   | log(1−ᾱ_t)                                      |
//! | `sqrt_recip_alpha_bar()`    | `sqrt_recip_alphas_cumprod`      | 1/√ᾱ_t (x_0 from ε, Eq. 4 solved for x_0)       |
//! | `sqrt_recipm1_alpha_bar()`  | `sqrt_recipm1_alphas_cumprod`    | √(1/ᾱ_t − 1)                                    |
//! | `beta_tilde()[i]`           | `posterior_variance`             | β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t, Eq. (7)          |
//! | `log_beta_tilde_clipped()`  | `posterior_log_variance_clipped` | log β̃_t, first entry per [`T0LogVariance`]      |
//! | `posterior_mean_coef1()`    | `posterior_mean_coef1`           | √ᾱ_{t−1} β_t/(1−ᾱ_t), factor of x_0 in Eq. (7)  |
//! | `posterior_mean_coef2()`    | `posterior_mean_coef2`           | √α_t (1−ᾱ_{t−1})/(1−ᾱ_t), factor of x_t, Eq. (7)|
//! | `log_betas()[i]`            | `np.log(betas)`                  | log β_t (upper end of N&D Eq. 15)               |
//! | `fixed_large_log_variance()`| (inside `p_mean_variance`)       | log σ_t² with σ_t² = β_t, first entry per [`FixedLargeT0`] |

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{Array1, ArrayD, IxDyn};

use super::convention::{
    Conventions, FixedLargeT0, LinearRescale, ModelTimestep, T0LogVariance, TablePrecision,
};
use crate::error::{Error, Result};
use crate::Tensor;

/// β_1 of the linear schedule of Ho et al. 2020 (§4, "β_1 = 10⁻⁴").
pub const LINEAR_BETA_START: f64 = 1e-4;
/// β_T of the linear schedule of Ho et al. 2020 (§4, "β_T = 0.02").
pub const LINEAR_BETA_END: f64 = 0.02;
/// The offset s of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17).
pub const COSINE_S: f64 = 0.008;
/// The cap on β of the cosine schedule (Nichol & Dhariwal 2021, §3.2).
pub const COSINE_MAX_BETA: f64 = 0.999;

/// Which family of β_t to use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// β evenly spaced from 1e-4 to 0.02 (Ho et al. 2020, §4); endpoints scaled by 1000/T under
    /// [`LinearRescale::ThousandOverT`].
    Linear,
    /// ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, and
    /// β_t = min(1 − ᾱ_t/ᾱ_{t−1}, 0.999) (Nichol & Dhariwal 2021, Eq. 17).
    Cosine,
    /// β = (evenly spaced from √1e-4 to √0.02)², Ho et al.'s `quad`.
    Quadratic,
    /// β = sigmoid(evenly spaced from −6 to 6)·(0.02 − 1e-4) + 1e-4, diffusers' `sigmoid`.
    Sigmoid,
    /// β = 0.02 at every step, Ho et al.'s `const`.
    Constant,
    /// β read from a file: a 1-D float64 `.npy`, or text with one number per line or separated
    /// by whitespace/commas (`#` starts a comment).
    File(PathBuf),
    /// β given as values, T of them: what a training run stores for a `file:` schedule, so
    /// that a resumed run never re-reads a file that may have changed.
    Custom(Vec<f64>),
}

impl fmt::Display for BetaSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BetaSchedule::Linear => f.write_str("linear"),
            BetaSchedule::Cosine => f.write_str("cosine"),
            BetaSchedule::Quadratic => f.write_str("quadratic"),
            BetaSchedule::Sigmoid => f.write_str("sigmoid"),
            BetaSchedule::Constant => f.write_str("constant"),
            BetaSchedule::File(p) => write!(f, "file:{}", p.display()),
            BetaSchedule::Custom(b) => write!(f, "custom ({} values)", b.len()),
        }
    }
}

impl FromStr for BetaSchedule {
    type Err = Error;

    /// Parses `linear`, `cosine`, `quadratic` (or `quad`), `sigmoid`, `constant` (or `const`),
    /// or `file:PATH`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] listing the accepted names.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(Error::config("schedule", "file: needs a path, e.g. file:betas.txt"));
            }
            return Ok(BetaSchedule::File(PathBuf::from(path)));
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "linear" => Ok(BetaSchedule::Linear),
            "cosine" => Ok(BetaSchedule::Cosine),
            "quadratic" | "quad" => Ok(BetaSchedule::Quadratic),
            "sigmoid" => Ok(BetaSchedule::Sigmoid),
            "constant" | "const" => Ok(BetaSchedule::Constant),
            _ => Err(Error::config(
                "schedule",
                format!(
                    "unknown schedule {s:?}; expected linear, cosine, quadratic, sigmoid, constant or file:PATH"
                ),
            )),
        }
    }
}

impl BetaSchedule {
    /// The T values β_1 … β_T (code indices 0 … T−1), before validation.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `timesteps` is 0; for [`BetaSchedule::File`], [`Error::Io`]
    /// or [`Error::BadFile`] if the file cannot be read or parsed, and [`Error::InvalidConfig`]
    /// if its length differs from `timesteps`.
    pub fn betas(&self, timesteps: usize, conventions: &Conventions) -> Result<Vec<f64>> {
        if timesteps == 0 {
            return Err(Error::config("timesteps", "T = 0: a diffusion needs at least 2 steps"));
        }
        if timesteps > NoiseSchedule::MAX_TIMESTEPS {
            return Err(Error::config(
                "timesteps",
                format!("T = {timesteps} is above the largest supported, {}", NoiseSchedule::MAX_TIMESTEPS),
            ));
        }
        let t = timesteps;
        Ok(match self {
            BetaSchedule::Linear => {
                let scale = match conventions.linear_rescale {
                    LinearRescale::None => 1.0,
                    LinearRescale::ThousandOverT => 1000.0 / t as f64,
                };
                match conventions.table_precision {
                    TablePrecision::Float64 => {
                        linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, t)
                    }
                    TablePrecision::Float32 => {
                        torch_linspace_f32(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, t)
                    }
                }
            }
            BetaSchedule::Cosine => (0..t)
                .map(|i| {
                    let t1 = i as f64 / t as f64;
                    let t2 = (i + 1) as f64 / t as f64;
                    (1.0 - cosine_f(t2) / cosine_f(t1)).min(COSINE_MAX_BETA)
                })
                .collect(),
            BetaSchedule::Quadratic => linspace(LINEAR_BETA_START.sqrt(), LINEAR_BETA_END.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Sigmoid => linspace(-6.0, 6.0, t)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * (LINEAR_BETA_END - LINEAR_BETA_START) + LINEAR_BETA_START)
                .collect(),
            BetaSchedule::Constant => vec![LINEAR_BETA_END; t],
            BetaSchedule::File(path) => {
                let betas = read_betas_file(path)?;
                if betas.len() != t {
                    return Err(Error::config(
                        "timesteps",
                        format!("{} holds {} betas but T = {t} was asked for", path.display(), betas.len()),
                    ));
                }
                betas
            }
            BetaSchedule::Custom(betas) => {
                if betas.len() != t {
                    return Err(Error::config(
                        "timesteps",
                        format!("the stored schedule holds {} betas but T = {t}", betas.len()),
                    ));
                }
                betas.clone()
            }
        })
    }
}

/// f(u) = cos²((u + s)/(1 + s) · π/2) with u = t/T (Nichol & Dhariwal 2021, Eq. 17).
fn cosine_f(u: f64) -> f64 {
    ((u + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::PI / 2.0).cos().powi(2)
}

/// The cosine schedule's ᾱ in closed form, f(t)/f(0), at paper step t ∈ [0, T]
/// (Nichol & Dhariwal 2021, Eq. 17). Equals `alpha_bar()[t − 1]` wherever no β was capped.
pub fn cosine_alpha_bar_closed_form(t: f64, timesteps: usize) -> f64 {
    cosine_f(t / timesteps as f64) / cosine_f(0.0)
}

/// `n` evenly spaced numbers from `start` to `end` inclusive, computed as numpy's `linspace`
/// does (start + i·step, with the last entry set to `end`), so tables match to the last bit.
pub fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = end;
            v
        }
    }
}

/// PyTorch's `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU, as diffusers builds
/// its linear β: the ends and step in f32, `start + i·step` for the first half and
/// `end − (n−1−i)·step` for the second, each a fused multiply-add (one rounding), as PyTorch's
/// AVX2/AVX512 builds compute it. Returned as f64 (exact f32 values).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    let (s, e) = (start as f32, end as f32);
    if n < 2 {
        return vec![f64::from(s); n];
    }
    let step = (e - s) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            let v =
                if i < n / 2 { step.mul_add(i as f32, s) } else { (-step).mul_add((n - 1 - i) as f32, e) };
            f64::from(v)
        })
        .collect()
}

/// Reads β from a file: a 1-D float64 `.npy`, or text (numbers separated by whitespace, commas
/// or newlines; `#` starts a comment).
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::BadFile`] if a token is not a number, the
/// `.npy` is not 1-D float64, or there is no number at all.
pub fn read_betas_file(path: &Path) -> Result<Vec<f64>> {
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    // A schedule of MAX_TIMESTEPS values fits in far less than this, as text or .npy.
    const MAX_BYTES: u64 = 64 << 20;
    parse_betas(&crate::files::read_capped(path, MAX_BYTES)?, is_npy, path)
}

/// [`read_betas_file`] for bytes in memory: a float64 `.npy` if `is_npy`, else text. `path`
/// names them in errors and is not read.
///
/// # Errors
/// [`Error::BadFile`] as [`read_betas_file`].
pub fn parse_betas(bytes: &[u8], is_npy: bool, path: &Path) -> Result<Vec<f64>> {
    if is_npy {
        let arr: ndarray::ArrayD<f64> = crate::files::parse_npy(bytes, path)?;
        if arr.ndim() != 1 {
            return Err(Error::bad_file(
                path,
                format!("expected a 1-D .npy of betas, not shape {:?}", arr.shape()),
            ));
        }
        if arr.is_empty() {
            return Err(Error::bad_file(path, "the .npy holds no betas"));
        }
        return Ok(arr.iter().copied().collect());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| {
        Error::bad_file(path, "not UTF-8 text (write one number per line, or a float64 .npy)")
    })?;
    let mut betas = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("");
        for token in content.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()) {
            let value: f64 = token.parse().map_err(|_| {
                Error::bad_file(
                    path,
                    format!("line {}: {token:?} is not a number (one beta per entry)", line_no + 1),
                )
            })?;
            betas.push(value);
            if betas.len() > NoiseSchedule::MAX_TIMESTEPS {
                return Err(Error::bad_file(
                    path,
                    format!("more than {} betas; no schedule is that long", NoiseSchedule::MAX_TIMESTEPS),
                ));
            }
        }
    }
    if betas.is_empty() {
        return Err(Error::bad_file(path, "no betas found (write one number per line)"));
    }
    Ok(betas)
}

/// Names one precomputed table of a [`NoiseSchedule`], for generic access and for export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// β_t.
    Betas,
    /// α_t = 1 − β_t.
    Alphas,
    /// ᾱ_t = ∏_{s≤t} α_s.
    AlphaBar,
    /// ᾱ_{t−1}, with ᾱ_0 = 1.
    AlphaBarPrev,
    /// √ᾱ_t.
    SqrtAlphaBar,
    /// √(1 − ᾱ_t).
    SqrtOneMinusAlphaBar,
    /// log(1 − ᾱ_t).
    LogOneMinusAlphaBar,
    /// 1/√ᾱ_t.
    SqrtRecipAlphaBar,
    /// √(1/ᾱ_t − 1).
    SqrtRecipm1AlphaBar,
    /// β̃_t, Eq. (7).
    BetaTilde,
    /// log β̃_t with the first entry per [`T0LogVariance`].
    LogBetaTildeClipped,
    /// √ᾱ_{t−1} β_t/(1 − ᾱ_t), Eq. (7).
    PosteriorMeanCoef1,
    /// √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), Eq. (7).
    PosteriorMeanCoef2,
    /// log β_t.
    LogBetas,
    /// log σ_t² for σ_t² = β_t, first entry per [`FixedLargeT0`].
    FixedLargeLogVariance,
}

impl Table {
    /// Every table, in the order of the module docs.
    pub const ALL: [Table; 15] = [
        Table::Betas,
        Table::Alphas,
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
        Table::LogBetas,
        Table::FixedLargeLogVariance,
    ];

    /// The table's name in improved-diffusion's `GaussianDiffusion` (the names written by
    /// `ddpm vectors`), or `None` for the tables it computes inline.
    pub fn improved_diffusion_name(self) -> Option<&'static str> {
        match self {
            Table::Betas => Some("betas"),
            Table::Alphas => None,
            Table::AlphaBar => Some("alphas_cumprod"),
            Table::AlphaBarPrev => Some("alphas_cumprod_prev"),
            Table::SqrtAlphaBar => Some("sqrt_alphas_cumprod"),
            Table::SqrtOneMinusAlphaBar => Some("sqrt_one_minus_alphas_cumprod"),
            Table::LogOneMinusAlphaBar => Some("log_one_minus_alphas_cumprod"),
            Table::SqrtRecipAlphaBar => Some("sqrt_recip_alphas_cumprod"),
            Table::SqrtRecipm1AlphaBar => Some("sqrt_recipm1_alphas_cumprod"),
            Table::BetaTilde => Some("posterior_variance"),
            Table::LogBetaTildeClipped => Some("posterior_log_variance_clipped"),
            Table::PosteriorMeanCoef1 => Some("posterior_mean_coef1"),
            Table::PosteriorMeanCoef2 => Some("posterior_mean_coef2"),
            Table::LogBetas => None,
            Table::FixedLargeLogVariance => None,
        }
    }
}

/// A validated β schedule with every derived table precomputed, in f64; all tables have length T.
///
/// Build it with [`NoiseSchedule::new`] or [`NoiseSchedule::from_betas`]; it is immutable after.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    conventions: Conventions,
    betas: Array1<f64>,
    alphas: Array1<f64>,
    alpha_bar: Array1<f64>,
    alpha_bar_prev: Array1<f64>,
    sqrt_alpha_bar: Array1<f64>,
    sqrt_one_minus_alpha_bar: Array1<f64>,
    log_one_minus_alpha_bar: Array1<f64>,
    sqrt_recip_alpha_bar: Array1<f64>,
    sqrt_recipm1_alpha_bar: Array1<f64>,
    beta_tilde: Array1<f64>,
    log_beta_tilde_clipped: Array1<f64>,
    posterior_mean_coef1: Array1<f64>,
    posterior_mean_coef2: Array1<f64>,
    log_betas: Array1<f64>,
    fixed_large_log_variance: Array1<f64>,
}

/// β, α and ᾱ as diffusers' `DDPMScheduler` holds and uses them ([`TablePrecision::Float32`]):
/// β and α = 1 − β in f32, ᾱ a running product in f64 rounded to f32 at each step (PyTorch's
/// CPU `cumprod` accumulates in double), then α_t = ᾱ_t/ᾱ_{t−1} and β_t = 1 − α_t in f32, the
/// values its `step` computes. Returned widened to f64.
fn float32_tables(betas: &[f64]) -> (Array1<f64>, Array1<f64>, Array1<f64>) {
    let mut running = 1.0f64;
    let alpha_bar32: Vec<f32> = betas
        .iter()
        .map(|&b| {
            running *= f64::from(1.0f32 - b as f32);
            running as f32
        })
        .collect();
    let alphas32: Vec<f32> =
        (0..betas.len()).map(|i| alpha_bar32[i] / if i == 0 { 1.0 } else { alpha_bar32[i - 1] }).collect();
    let widen = |v: &[f32]| Array1::from_iter(v.iter().map(|&x| f64::from(x)));
    let betas32: Vec<f32> = alphas32.iter().map(|&a| 1.0 - a).collect();
    (widen(&betas32), widen(&alphas32), widen(&alpha_bar32))
}

impl NoiseSchedule {
    /// The largest T accepted (a million steps; its tables take about 130 MB). Larger values
    /// come only from corrupt or hostile configurations and would exhaust memory.
    pub const MAX_TIMESTEPS: usize = 1_000_000;

    /// Builds the β of `schedule` for `timesteps` steps and precomputes every table.
    ///
    /// # Errors
    /// As [`BetaSchedule::betas`] and [`NoiseSchedule::from_betas`]; for a file schedule, an
    /// invalid β is reported as [`Error::BadFile`] naming the file.
    pub fn new(schedule: &BetaSchedule, timesteps: usize, conventions: Conventions) -> Result<Self> {
        let betas = schedule.betas(timesteps, &conventions)?;
        match (schedule, Self::from_betas(betas, conventions)) {
            (BetaSchedule::File(path), Err(Error::InvalidConfig { reason, .. })) => {
                Err(Error::bad_file(path, reason))
            }
            (_, result) => result,
        }
    }

    /// Validates `betas` (β_1 … β_T) and precomputes every table.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if T < 2 (the first-step conventions borrow index 1), if any β
    /// is not a finite number in (0, 1), or if ᾱ is not strictly decreasing and positive at the
    /// precision of [`TablePrecision`]
    /// (a β so small that 1 − β rounds to 1, or ᾱ underflowing to 0).
    pub fn from_betas(betas: Vec<f64>, conventions: Conventions) -> Result<Self> {
        let t_len = betas.len();
        if t_len < 2 {
            return Err(Error::config(
                "schedule",
                format!("T = {t_len}: at least 2 steps are needed (β̃ at t = 1 is 0 and the references borrow t = 2)"),
            ));
        }
        if t_len > Self::MAX_TIMESTEPS {
            return Err(Error::config(
                "schedule",
                format!("T = {t_len} is above the largest supported, {}", Self::MAX_TIMESTEPS),
            ));
        }
        for (i, &b) in betas.iter().enumerate() {
            if !(b.is_finite() && b > 0.0 && b < 1.0) {
                return Err(Error::config(
                    "schedule",
                    format!("β at index {i} (paper t = {}) is {b}; every β must lie in (0, 1)", i + 1),
                ));
            }
        }
        let (betas, alphas, alpha_bar) = match conventions.table_precision {
            TablePrecision::Float64 => {
                let betas = Array1::from(betas);
                let alphas = betas.mapv(|b| 1.0 - b);
                let mut alpha_bar = Array1::<f64>::zeros(t_len);
                let mut running = 1.0;
                for i in 0..t_len {
                    running *= alphas[i];
                    alpha_bar[i] = running;
                }
                (betas, alphas, alpha_bar)
            }
            TablePrecision::Float32 => float32_tables(&betas),
        };
        let mut running = 1.0;
        for i in 0..t_len {
            let next = alpha_bar[i];
            if !(next > 0.0 && next < running) {
                return Err(Error::config(
                    "schedule",
                    format!(
                        "ᾱ is not strictly decreasing and positive at index {i} (paper t = {}): ᾱ goes from {running:e} to {next:e} \
                         (β = {:e} is below the tables' resolution, or ᾱ underflowed); use larger β or fewer steps",
                        i + 1,
                        betas[i]
                    ),
                ));
            }
            running = next;
        }
        let mut alpha_bar_prev = Array1::<f64>::ones(t_len);
        alpha_bar_prev.slice_mut(ndarray::s![1..]).assign(&alpha_bar.slice(ndarray::s![..t_len - 1]));

        let sqrt_alpha_bar = alpha_bar.mapv(f64::sqrt);
        let sqrt_one_minus_alpha_bar = alpha_bar.mapv(|a| (1.0 - a).sqrt());
        let log_one_minus_alpha_bar = alpha_bar.mapv(|a| (1.0 - a).ln());
        let sqrt_recip_alpha_bar = alpha_bar.mapv(|a| (1.0 / a).sqrt());
        let sqrt_recipm1_alpha_bar = alpha_bar.mapv(|a| (1.0 / a - 1.0).sqrt());

        // Eq. (7); the same operation order as the reference code so tables match bit for bit.
        let beta_tilde =
            Array1::from_shape_fn(t_len, |i| betas[i] * (1.0 - alpha_bar_prev[i]) / (1.0 - alpha_bar[i]));
        let log_beta_tilde_clipped = match conventions.t0_log_variance {
            T0LogVariance::SecondStep => {
                Array1::from_shape_fn(t_len, |i| if i == 0 { beta_tilde[1].ln() } else { beta_tilde[i].ln() })
            }
            T0LogVariance::Floor1e20 => beta_tilde.mapv(|v| v.max(1e-20).ln()),
        };
        let posterior_mean_coef1 =
            Array1::from_shape_fn(t_len, |i| betas[i] * alpha_bar_prev[i].sqrt() / (1.0 - alpha_bar[i]));
        let posterior_mean_coef2 = Array1::from_shape_fn(t_len, |i| {
            (1.0 - alpha_bar_prev[i]) * alphas[i].sqrt() / (1.0 - alpha_bar[i])
        });
        let log_betas = betas.mapv(f64::ln);
        let fixed_large_log_variance = match conventions.fixed_large_t0 {
            FixedLargeT0::SecondStepPosterior => {
                Array1::from_shape_fn(t_len, |i| if i == 0 { beta_tilde[1].ln() } else { log_betas[i] })
            }
            FixedLargeT0::Beta => log_betas.clone(),
        };

        let schedule = NoiseSchedule {
            conventions,
            betas,
            alphas,
            alpha_bar,
            alpha_bar_prev,
            sqrt_alpha_bar,
            sqrt_one_minus_alpha_bar,
            log_one_minus_alpha_bar,
            sqrt_recip_alpha_bar,
            sqrt_recipm1_alpha_bar,
            beta_tilde,
            log_beta_tilde_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
            log_betas,
            fixed_large_log_variance,
        };
        for which in Table::ALL {
            if let Some(i) = schedule.table(which).iter().position(|v| !v.is_finite()) {
                return Err(Error::config(
                    "schedule",
                    format!(
                        "table {which:?} is not finite at index {i} (paper t = {}); the β are too extreme",
                        i + 1
                    ),
                ));
            }
        }
        Ok(schedule)
    }

    /// T, the number of diffusion steps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The conventions the tables were built with.
    pub fn conventions(&self) -> &Conventions {
        &self.conventions
    }

    /// β_t (Ho Eq. 2), shape `[T]`.
    pub fn betas(&self) -> &Array1<f64> {
        &self.betas
    }
    /// α_t = 1 − β_t, shape `[T]`.
    pub fn alphas(&self) -> &Array1<f64> {
        &self.alphas
    }
    /// ᾱ_t = ∏_{s≤t} α_s (Ho §2, used in Eq. 4), shape `[T]`.
    pub fn alpha_bar(&self) -> &Array1<f64> {
        &self.alpha_bar
    }
    /// ᾱ_{t−1} with ᾱ_0 = 1, shape `[T]`.
    pub fn alpha_bar_prev(&self) -> &Array1<f64> {
        &self.alpha_bar_prev
    }
    /// √ᾱ_t, the mean factor of q(x_t ∣ x_0) (Eq. 4), shape `[T]`.
    pub fn sqrt_alpha_bar(&self) -> &Array1<f64> {
        &self.sqrt_alpha_bar
    }
    /// √(1 − ᾱ_t), the standard deviation of q(x_t ∣ x_0) (Eq. 4), shape `[T]`.
    pub fn sqrt_one_minus_alpha_bar(&self) -> &Array1<f64> {
        &self.sqrt_one_minus_alpha_bar
    }
    /// log(1 − ᾱ_t), the log-variance of q(x_t ∣ x_0) (Eq. 4), shape `[T]`.
    pub fn log_one_minus_alpha_bar(&self) -> &Array1<f64> {
        &self.log_one_minus_alpha_bar
    }
    /// 1/√ᾱ_t, shape `[T]`.
    pub fn sqrt_recip_alpha_bar(&self) -> &Array1<f64> {
        &self.sqrt_recip_alpha_bar
    }
    /// √(1/ᾱ_t − 1), shape `[T]`.
    pub fn sqrt_recipm1_alpha_bar(&self) -> &Array1<f64> {
        &self.sqrt_recipm1_alpha_bar
    }
    /// β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t, the posterior variance (Eq. 7); 0 at index 0. Shape `[T]`.
    pub fn beta_tilde(&self) -> &Array1<f64> {
        &self.beta_tilde
    }
    /// log β̃_t, with index 0 per [`T0LogVariance`] (β̃ is 0 there). Shape `[T]`.
    pub fn log_beta_tilde_clipped(&self) -> &Array1<f64> {
        &self.log_beta_tilde_clipped
    }
    /// √ᾱ_{t−1} β_t/(1 − ᾱ_t), the factor of x_0 in μ̃_t (Eq. 7), shape `[T]`.
    pub fn posterior_mean_coef1(&self) -> &Array1<f64> {
        &self.posterior_mean_coef1
    }
    /// √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), the factor of x_t in μ̃_t (Eq. 7), shape `[T]`.
    pub fn posterior_mean_coef2(&self) -> &Array1<f64> {
        &self.posterior_mean_coef2
    }
    /// log β_t, the upper end of the learned range (Nichol & Dhariwal Eq. 15), shape `[T]`.
    pub fn log_betas(&self) -> &Array1<f64> {
        &self.log_betas
    }
    /// log σ_t² for the fixed-large choice σ_t² = β_t (Ho §3.2), index 0 per [`FixedLargeT0`]. Shape `[T]`.
    pub fn fixed_large_log_variance(&self) -> &Array1<f64> {
        &self.fixed_large_log_variance
    }

    /// The table named by `which`, shape `[T]`.
    pub fn table(&self, which: Table) -> &Array1<f64> {
        match which {
            Table::Betas => &self.betas,
            Table::Alphas => &self.alphas,
            Table::AlphaBar => &self.alpha_bar,
            Table::AlphaBarPrev => &self.alpha_bar_prev,
            Table::SqrtAlphaBar => &self.sqrt_alpha_bar,
            Table::SqrtOneMinusAlphaBar => &self.sqrt_one_minus_alpha_bar,
            Table::LogOneMinusAlphaBar => &self.log_one_minus_alpha_bar,
            Table::SqrtRecipAlphaBar => &self.sqrt_recip_alpha_bar,
            Table::SqrtRecipm1AlphaBar => &self.sqrt_recipm1_alpha_bar,
            Table::BetaTilde => &self.beta_tilde,
            Table::LogBetaTildeClipped => &self.log_beta_tilde_clipped,
            Table::PosteriorMeanCoef1 => &self.posterior_mean_coef1,
            Table::PosteriorMeanCoef2 => &self.posterior_mean_coef2,
            Table::LogBetas => &self.log_betas,
            Table::FixedLargeLogVariance => &self.fixed_large_log_variance,
        }
    }

    /// Gathers `which` at the batch's timesteps: out\[n\] = table\[t\[n\]\], shape `[N]`.
    ///
    /// # Panics
    /// If some `t[n] >= T`.
    pub fn extract(&self, which: Table, t: &[usize]) -> Array1<f64> {
        let table = self.table(which);
        let big_t = self.num_timesteps();
        Array1::from_iter(t.iter().map(|&ti| {
            assert!(ti < big_t, "extract: timestep index {ti} out of range 0..{big_t}");
            table[ti]
        }))
    }

    /// [`NoiseSchedule::extract`] rounded to f32, for the training code's tensors. Shape `[N]`.
    ///
    /// # Panics
    /// If some `t[n] >= T`.
    pub fn extract_f32(&self, which: Table, t: &[usize]) -> Array1<f32> {
        self.extract(which, t).mapv(|v| v as f32)
    }

    /// [`NoiseSchedule::extract`] shaped `[N, 1, …, 1]` with `ndim` axes, ready to broadcast
    /// against a batch `[N, C, H, W]` (improved-diffusion's `_extract_into_tensor` without the
    /// final broadcast).
    ///
    /// # Panics
    /// If some `t[n] >= T` or `ndim == 0`.
    pub fn extract_broadcast(&self, which: Table, t: &[usize], ndim: usize) -> ArrayD<f64> {
        assert!(ndim >= 1, "extract_broadcast: ndim must be at least 1");
        let mut shape = vec![1; ndim];
        shape[0] = t.len();
        self.extract(which, t).into_shape_with_order(IxDyn(&shape)).expect("N values fill [N, 1, …, 1]")
    }

    /// [`NoiseSchedule::extract_broadcast`] as an f32 [`Tensor`] of shape `[N, 1, …, 1]`.
    ///
    /// # Panics
    /// If some `t[n] >= T` or `ndim == 0`.
    pub fn extract_broadcast_f32(&self, which: Table, t: &[usize], ndim: usize) -> Tensor {
        self.extract_broadcast(which, t, ndim).mapv(|v| v as f32)
    }

    /// The number the network receives for code index `t`, per [`ModelTimestep`]:
    /// `t` itself, or `t · 1000/T`.
    pub fn model_timestep(&self, t: usize) -> f64 {
        match self.conventions.model_timestep {
            ModelTimestep::Index => t as f64,
            ModelTimestep::ScaledTo1000 => t as f64 * (1000.0 / self.num_timesteps() as f64),
        }
    }

    /// [`NoiseSchedule::model_timestep`] for a batch, as f32, shape `[N]`.
    pub fn model_timesteps_f32(&self, t: &[usize]) -> Array1<f32> {
        Array1::from_iter(t.iter().map(|&ti| self.model_timestep(ti) as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::convention::Convention;

    fn linear(t: usize) -> NoiseSchedule {
        NoiseSchedule::new(&BetaSchedule::Linear, t, Conventions::default())
            .expect("linear schedule is valid")
    }

    // Known values for the linear schedule, T = 1000, β from 1e-4 to 0.02. Source: numpy float64,
    //   b = np.linspace(1e-4, 0.02, 1000); ab = np.cumprod(1 - b); abp = np.append(1, ab[:-1])
    //   pv = b * (1 - abp) / (1 - ab); np.log(np.append(pv[1], pv[1:]))
    // (the table definitions of diffusion_utils_2.py), printed with repr().
    #[test]
    fn linear_t1000_matches_numpy_known_values() {
        let s = linear(1000);
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        assert!(rel(s.alpha_bar()[999], 4.035829765375676e-05) < 1e-12, "{}", s.alpha_bar()[999]);
        assert!(rel(s.beta_tilde()[487], 0.00979157198569004) < 1e-13, "{}", s.beta_tilde()[487]);
        assert!(rel(s.log_beta_tilde_clipped()[0], -9.81672513529567) < 1e-14);
        // The rounded values quoted in the issue.
        assert!((s.alpha_bar()[999] - 4.0358e-5).abs() < 1e-9);
        assert!((s.beta_tilde()[487] - 0.0097916).abs() < 1e-7);
        assert!((s.log_beta_tilde_clipped()[0] - (-9.8167251)).abs() < 1e-7);
    }

    #[test]
    fn linspace_hits_both_ends_like_numpy() {
        let v = linspace(1e-4, 0.02, 1000);
        assert_eq!(v[0], 1e-4);
        assert_eq!(v[999], 0.02);
        assert_eq!(linspace(3.0, 5.0, 1), vec![3.0]);
    }

    #[test]
    fn tables_obey_their_definitions() {
        let s = linear(50);
        for i in 0..50 {
            let ab = s.alpha_bar()[i];
            let abp = if i == 0 { 1.0 } else { s.alpha_bar()[i - 1] };
            assert_eq!(s.alpha_bar_prev()[i], abp);
            assert!((s.sqrt_alpha_bar()[i].powi(2) - ab).abs() < 1e-15);
            assert!((s.sqrt_one_minus_alpha_bar()[i].powi(2) - (1.0 - ab)).abs() < 1e-15);
            assert!((s.sqrt_recip_alpha_bar()[i] * s.sqrt_alpha_bar()[i] - 1.0).abs() < 1e-15);
            assert!((s.sqrt_recipm1_alpha_bar()[i] - ((1.0 - ab) / ab).sqrt()).abs() < 1e-14);
        }
        assert_eq!(s.beta_tilde()[0], 0.0);
        assert_eq!(s.log_beta_tilde_clipped()[0], s.beta_tilde()[1].ln());
        assert_eq!(s.fixed_large_log_variance()[0], s.beta_tilde()[1].ln());
        assert_eq!(s.fixed_large_log_variance()[7], s.betas()[7].ln());
    }

    #[test]
    fn diffusers_convention_floors_the_first_log_variance_and_keeps_beta() {
        let s =
            NoiseSchedule::new(&BetaSchedule::Linear, 10, Convention::Diffusers.settings()).expect("valid");
        assert_eq!(s.log_beta_tilde_clipped()[0], 1e-20f64.ln());
        assert_eq!(s.fixed_large_log_variance()[0], s.betas()[0].ln());
    }

    #[test]
    fn improved_diffusion_rescales_the_linear_schedule_and_the_model_timestep() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 100, Convention::ImprovedDiffusion.settings())
            .expect("valid");
        assert!((s.betas()[0] - 1e-3).abs() < 1e-18);
        assert!((s.betas()[99] - 0.2).abs() < 1e-15);
        assert_eq!(s.model_timestep(7), 70.0);
        assert_eq!(linear(100).model_timestep(7), 7.0);
    }

    #[test]
    fn quadratic_sigmoid_and_constant_follow_their_definitions() {
        let c = Conventions::default();
        let q = BetaSchedule::Quadratic.betas(10, &c).expect("valid");
        assert!((q[0] - 1e-4).abs() < 1e-18 && (q[9] - 0.02).abs() < 1e-17);
        assert!(q.windows(2).all(|w| w[1] > w[0]));
        let s = BetaSchedule::Sigmoid.betas(11, &c).expect("valid");
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!((s[0] - (sig(-6.0) * (0.02 - 1e-4) + 1e-4)).abs() < 1e-18);
        assert!((s[5] - (0.5 * (0.02 - 1e-4) + 1e-4)).abs() < 1e-17, "the midpoint is sigmoid(0) = 1/2");
        assert_eq!(BetaSchedule::Constant.betas(3, &c).expect("valid"), vec![0.02; 3]);
        for name in ["linear", "cosine", "quadratic", "sigmoid", "constant"] {
            let parsed: BetaSchedule = name.parse().expect("known name");
            assert_eq!(parsed.to_string(), name);
        }
        assert!("warmup".parse::<BetaSchedule>().is_err());
    }

    #[test]
    fn cosine_alpha_bar_follows_its_closed_form_where_beta_is_not_capped() {
        for t_len in [10, 100, 1000] {
            let s = NoiseSchedule::new(&BetaSchedule::Cosine, t_len, Conventions::default()).expect("valid");
            for i in 0..t_len {
                let capped = s.betas().iter().take(i + 1).any(|&b| b >= COSINE_MAX_BETA);
                if !capped {
                    let want = cosine_alpha_bar_closed_form((i + 1) as f64, t_len);
                    assert!(((s.alpha_bar()[i] - want) / want).abs() < 1e-11, "T={t_len} i={i}");
                }
            }
            assert_eq!(s.betas()[t_len - 1], COSINE_MAX_BETA, "the last β is capped");
        }
    }

    #[test]
    fn invalid_schedules_are_refused_with_a_clear_message() {
        let c = Conventions::default();
        let msg = |r: Result<NoiseSchedule>| r.expect_err("must be refused").to_string();
        assert!(msg(NoiseSchedule::new(&BetaSchedule::Linear, 0, c)).contains("T = 0"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.1], c)).contains("at least 2"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.1, 1.0], c)).contains("index 1"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.1, -0.2], c)).contains("(0, 1)"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.1, f64::NAN], c)).contains("(0, 1)"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.1, 1e-18], c)).contains("strictly decreasing"));
        assert!(msg(NoiseSchedule::from_betas(vec![0.99; 400], c)).contains("strictly decreasing"));
        // improved-diffusion's rescaling makes β_T = 0.02 · 1000/10 = 2 > 1.
        let r = NoiseSchedule::new(&BetaSchedule::Linear, 10, Convention::ImprovedDiffusion.settings());
        assert!(msg(r).contains("(0, 1)"));
    }

    #[test]
    fn betas_file_is_read_and_bad_files_name_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let good = dir.path().join("betas.txt");
        std::fs::write(&good, "# my schedule\n0.001, 0.002\n0.003 # last\n").expect("write");
        let s =
            NoiseSchedule::new(&BetaSchedule::File(good.clone()), 3, Conventions::default()).expect("valid");
        assert_eq!(s.betas().to_vec(), vec![0.001, 0.002, 0.003]);
        let wrong_len = NoiseSchedule::new(&BetaSchedule::File(good), 4, Conventions::default());
        assert!(wrong_len.expect_err("length mismatch").to_string().contains("holds 3 betas"));

        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "0.1\nzero\n").expect("write");
        let e = read_betas_file(&bad).expect_err("not a number");
        assert!(matches!(e, Error::BadFile { .. }) && e.to_string().contains("line 2"), "{e}");

        let out_of_range = dir.path().join("range.txt");
        std::fs::write(&out_of_range, "0.1 1.5").expect("write");
        let e = NoiseSchedule::new(&BetaSchedule::File(out_of_range), 2, Conventions::default())
            .expect_err("β > 1");
        assert!(matches!(e, Error::BadFile { .. }), "{e}");

        let missing = read_betas_file(&dir.path().join("missing.txt")).expect_err("unreadable");
        assert!(matches!(missing, Error::Io { .. }));
    }

    #[test]
    fn extract_gathers_per_sample_and_broadcasts() {
        let s = linear(10);
        let t = [0usize, 9, 3];
        let v = s.extract(Table::AlphaBar, &t);
        assert_eq!(v.to_vec(), vec![s.alpha_bar()[0], s.alpha_bar()[9], s.alpha_bar()[3]]);
        let b = s.extract_broadcast_f32(Table::SqrtAlphaBar, &t, 4);
        assert_eq!(b.shape(), &[3, 1, 1, 1]);
        assert_eq!(b[[1, 0, 0, 0]], s.sqrt_alpha_bar()[9] as f32);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn extract_panics_on_a_timestep_past_the_end() {
        linear(10).extract(Table::Betas, &[10]);
    }
}
