//! The statistics of the score, on feature matrices `[n, d]` (rows are images) and class
//! probabilities `[n, K]`, all in f64:
//!
//! | function | figure |
//! |---|---|
//! | [`frechet_distance`] | FD: ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_r^{1/2} Σ_g Σ_r^{1/2})^{1/2}) (Heusel et al. 2017, Dowson & Landau 1982) |
//! | [`mmd2_unbiased`], [`kid`] | KID: unbiased MMD² with k(x, y) = (xᵀy/d + 1)³, averaged over seeded subsets (Bińkowski et al. 2018) |
//! | [`precision_recall`] | k-NN manifold precision and recall (Kynkäänniemi et al. 2019) |
//! | [`class_stats`] | the arg-max class histogram, its entropy and the share of confident predictions |

use nalgebra::{DMatrix, SymmetricEigen};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::Rng;

/// Mean and covariance of a feature set (the covariance with the unbiased 1/(n − 1)).
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    /// `[d]` mean.
    pub mean: Array1<f64>,
    /// `[d, d]` covariance.
    pub cov: Array2<f64>,
}

impl Gaussian {
    /// Fits the mean and the unbiased covariance of the rows of `x` `[n, d]`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if there are fewer than 2 rows.
    pub fn fit(x: ArrayView2<f64>) -> Result<Self> {
        let n = x.nrows();
        if n < 2 {
            return Err(Error::config("feature statistics", format!("{n} images; at least 2 are needed")));
        }
        let mean = x.mean_axis(Axis(0)).expect("n >= 2 rows");
        let centred = &x - &mean;
        let cov = centred.t().dot(&centred) / (n - 1) as f64;
        Ok(Self { mean, cov })
    }
}

/// The symmetric eigendecomposition of `a` (symmetrised first, `(a + aᵀ)/2`, against rounding).
fn symmetric_eigen(a: &Array2<f64>) -> SymmetricEigen<f64, nalgebra::Dyn> {
    let d = a.nrows();
    let m = DMatrix::from_fn(d, d, |i, j| 0.5 * (a[[i, j]] + a[[j, i]]));
    SymmetricEigen::new(m)
}

/// The square root of a symmetric positive semi-definite matrix, `V diag(√max(λ, 0)) Vᵀ`
/// (eigenvalues below 0, from rounding, are taken as 0).
pub fn sqrtm_psd(a: &Array2<f64>) -> Array2<f64> {
    let eig = symmetric_eigen(a);
    let d = a.nrows();
    let v = &eig.eigenvectors;
    let roots: Vec<f64> = eig.eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).collect();
    Array2::from_shape_fn((d, d), |(i, j)| (0..d).map(|k| v[(i, k)] * roots[k] * v[(j, k)]).sum())
}

/// The Fréchet (2-Wasserstein) distance between the Gaussians fitted to two feature sets:
/// `‖μ_a − μ_b‖² + Tr Σ_a + Tr Σ_b − 2 Tr (Σ_b^{1/2} Σ_a Σ_b^{1/2})^{1/2}`. The last trace is
/// `Σ √λ_i` over the eigenvalues of the symmetric PSD matrix `Σ_b^{1/2} Σ_a Σ_b^{1/2}` (the same
/// as those of `Σ_a Σ_b`, whose square root scipy's `sqrtm` takes), negative rounding clamped to 0.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    let diff = &a.mean - &b.mean;
    let s = sqrtm_psd(&b.cov);
    let m = s.dot(&a.cov).dot(&s);
    let tr_sqrt: f64 = symmetric_eigen(&m).eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).sum();
    let fd = diff.dot(&diff) + a.cov.diag().sum() + b.cov.diag().sum() - 2.0 * tr_sqrt;
    // FD is a squared distance; rounding can leave −1e-12 for identical sets.
    fd.max(0.0)
}

/// The polynomial kernel of KID, `(xᵀy/d + 1)³`, for every pair of rows of `x` and `y`.
fn poly_kernel(x: ArrayView2<f64>, y: ArrayView2<f64>) -> Array2<f64> {
    let d = x.ncols() as f64;
    x.dot(&y.t()).mapv(|v| (v / d + 1.0).powi(3))
}

/// The unbiased estimate of MMD² between the distributions of the rows of `x` and `y` (`m` rows
/// each) with the kernel `(xᵀy/d + 1)³`:
/// `(Σ_{i≠j} k(x_i, x_j) + Σ_{i≠j} k(y_i, y_j)) / (m(m − 1)) − 2 Σ_{i,j} k(x_i, y_j) / m²`.
///
/// # Panics
/// If the row counts differ or are below 2, or the widths differ.
pub fn mmd2_unbiased(x: ArrayView2<f64>, y: ArrayView2<f64>) -> f64 {
    let m = x.nrows();
    assert!(
        m >= 2 && y.nrows() == m && x.ncols() == y.ncols(),
        "mmd2_unbiased: {:?} vs {:?}",
        x.dim(),
        y.dim()
    );
    let off_diagonal = |k: Array2<f64>| k.sum() - k.diag().sum();
    let kxx = off_diagonal(poly_kernel(x, x));
    let kyy = off_diagonal(poly_kernel(y, y));
    let kxy = poly_kernel(x, y).sum();
    let m = m as f64;
    (kxx + kyy) / (m * (m - 1.0)) - 2.0 * kxy / (m * m)
}

/// KID and its standard error.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Kid {
    /// The mean of [`mmd2_unbiased`] over the subsets.
    pub kid: f64,
    /// The standard deviation over subsets (with 1/(S − 1)) divided by √S.
    pub kid_se: f64,
}

/// KID between two feature sets: [`mmd2_unbiased`] on `subsets` pairs of `m = min(n_a, n_b,
/// subset_size)` rows drawn without replacement from each side, seeded.
///
/// # Errors
/// [`Error::InvalidConfig`] if either side has fewer than 2 rows, the widths differ, or
/// `subsets` is 0.
pub fn kid(
    a: ArrayView2<f64>,
    b: ArrayView2<f64>,
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<Kid> {
    let m = a.nrows().min(b.nrows()).min(subset_size);
    if m < 2 || a.ncols() != b.ncols() || subsets == 0 {
        return Err(Error::config(
            "KID",
            format!(
                "{:?} and {:?} features, {subsets} subsets: need 2 rows a side, equal widths, 1 subset",
                a.dim(),
                b.dim()
            ),
        ));
    }
    let mut rng = Rng::seed_from_u64(seed);
    let values: Vec<f64> = (0..subsets)
        .map(|_| {
            let ia = rand::seq::index::sample(&mut rng, a.nrows(), m).into_vec();
            let ib = rand::seq::index::sample(&mut rng, b.nrows(), m).into_vec();
            mmd2_unbiased(a.select(Axis(0), &ia).view(), b.select(Axis(0), &ib).view())
        })
        .collect();
    let s = values.len() as f64;
    let mean = values.iter().sum::<f64>() / s;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (s - 1.0)
    } else {
        0.0
    };
    Ok(Kid { kid: mean, kid_se: (var / s).sqrt() })
}

/// Squared Euclidean distances between every row of `x` and every row of `y`.
fn squared_distances(x: ArrayView2<f64>, y: ArrayView2<f64>) -> Array2<f64> {
    let nx: Vec<f64> = x.rows().into_iter().map(|r| r.dot(&r)).collect();
    let ny: Vec<f64> = y.rows().into_iter().map(|r| r.dot(&r)).collect();
    let mut d = x.dot(&y.t());
    for ((i, j), v) in d.indexed_iter_mut() {
        *v = (nx[i] + ny[j] - 2.0 * *v).max(0.0);
    }
    d
}

/// Each row's squared distance to its k-th nearest other row of the same set.
fn knn_radii(x: ArrayView2<f64>, k: usize) -> Vec<f64> {
    let d = squared_distances(x, x);
    d.rows()
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let mut others: Vec<f64> =
                row.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, &v)| v).collect();
            let (_, kth, _) = others.select_nth_unstable_by(k - 1, f64::total_cmp);
            *kth
        })
        .collect()
}

/// The share of rows of `query` that lie within the k-NN radius of some row of `manifold`.
fn coverage(manifold: ArrayView2<f64>, radii: &[f64], query: ArrayView2<f64>) -> f64 {
    let d = squared_distances(query, manifold);
    let inside =
        d.rows().into_iter().filter(|row| row.iter().zip(radii).any(|(&dist, &r)| dist <= r)).count();
    inside as f64 / query.nrows() as f64
}

/// Precision and recall of generated features against real ones.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PrecisionRecall {
    /// The share of generated samples inside the real manifold.
    pub precision: f64,
    /// The share of real samples inside the generated manifold.
    pub recall: f64,
}

/// Kynkäänniemi et al. 2019: each set's manifold is the union of balls around its rows, each of
/// radius the distance to its k-th nearest neighbour in the set; precision is the share of
/// `generated` inside the real manifold, recall the share of `real` inside the generated one.
///
/// # Errors
/// [`Error::InvalidConfig`] if either set has `k` rows or fewer, `k` is 0, or the widths differ.
pub fn precision_recall(
    real: ArrayView2<f64>,
    generated: ArrayView2<f64>,
    k: usize,
) -> Result<PrecisionRecall> {
    if k == 0 || real.nrows() <= k || generated.nrows() <= k || real.ncols() != generated.ncols() {
        return Err(Error::config(
            "precision and recall",
            format!(
                "{:?} real and {:?} generated features with k = {k}: need more than k rows a side",
                real.dim(),
                generated.dim()
            ),
        ));
    }
    let real_radii = knn_radii(real, k);
    let gen_radii = knn_radii(generated, k);
    Ok(PrecisionRecall {
        precision: coverage(real, &real_radii, generated),
        recall: coverage(generated, &gen_radii, real),
    })
}

/// What the classifier says about a set of images.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClassStats {
    /// How many images have each class as their arg-max.
    pub class_hist: Vec<usize>,
    /// The entropy of that histogram as a distribution, in nats (ln K when uniform).
    pub class_entropy: f64,
    /// The share of images whose largest probability is at least 0.9.
    pub frac_conf90: f64,
}

/// [`ClassStats`] of softmax probabilities `[n, K]`.
pub fn class_stats(probs: ArrayView2<f64>) -> ClassStats {
    let (n, k) = probs.dim();
    let mut class_hist = vec![0usize; k];
    let mut confident = 0usize;
    for row in probs.rows() {
        let row = row.to_vec();
        let best = super::classifier::argmax(&row);
        class_hist[best] += 1;
        if row[best] >= 0.9 {
            confident += 1;
        }
    }
    let class_entropy = class_hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    ClassStats {
        class_hist,
        class_entropy,
        frac_conf90: if n == 0 { 0.0 } else { confident as f64 / n as f64 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand_distr::{Distribution, StandardNormal};

    fn normal(n: usize, d: usize, shift: f64, scale: f64, seed: u64) -> Array2<f64> {
        let mut rng = Rng::seed_from_u64(seed);
        Array2::from_shape_simple_fn((n, d), || {
            let z: f64 = StandardNormal.sample(&mut rng);
            shift + scale * z
        })
    }

    #[test]
    fn frechet_distance_of_a_set_with_itself_is_zero() {
        let x = normal(50, 4, 0.0, 1.0, 1);
        let g = Gaussian::fit(x.view()).unwrap();
        assert!(frechet_distance(&g, &g) < 1e-9);
    }

    #[test]
    fn frechet_distance_matches_its_closed_form_for_diagonal_gaussians() {
        // Between N(μ1, diag(s1²)) and N(μ2, diag(s2²)): Σ_i (μ1_i − μ2_i)² + (s1_i − s2_i)².
        let a = Gaussian { mean: array![0.0, 1.0, 2.0], cov: Array2::from_diag(&array![1.0, 4.0, 9.0]) };
        let b = Gaussian { mean: array![1.0, 1.0, 0.0], cov: Array2::from_diag(&array![4.0, 1.0, 0.25]) };
        let expected =
            1.0 + 0.0 + 4.0 + (1.0f64 - 2.0).powi(2) + (2.0f64 - 1.0).powi(2) + (3.0f64 - 0.5).powi(2);
        assert!((frechet_distance(&a, &b) - expected).abs() < 1e-10);
        assert!((frechet_distance(&b, &a) - expected).abs() < 1e-10, "FD is symmetric");
    }

    #[test]
    fn frechet_distance_handles_non_commuting_covariances() {
        // Two rotated covariances in 2-d: the closed form of W2² between centred Gaussians is
        // Tr A + Tr B − 2 Tr (A^{1/2} B A^{1/2})^{1/2}; for 2×2 PSD matrices
        // Tr √M = √(Tr M + 2 √det M).
        let a = array![[2.0, 0.5], [0.5, 1.0]];
        let b = array![[1.0, -0.3], [-0.3, 3.0]];
        let sa = sqrtm_psd(&a);
        assert!((sa.dot(&sa) - &a).iter().all(|v| v.abs() < 1e-12), "sqrtm squares back");
        let m = sa.dot(&b).dot(&sa);
        let det = m[[0, 0]] * m[[1, 1]] - m[[0, 1]] * m[[1, 0]];
        let tr_sqrt = (m[[0, 0]] + m[[1, 1]] + 2.0 * det.sqrt()).sqrt();
        let expected = 3.0 + 4.0 - 2.0 * tr_sqrt;
        let ga = Gaussian { mean: array![0.0, 0.0], cov: a };
        let gb = Gaussian { mean: array![0.0, 0.0], cov: b };
        assert!((frechet_distance(&ga, &gb) - expected).abs() < 1e-10);
    }

    #[test]
    fn kid_is_unbiased_for_two_samples_of_one_distribution() {
        // Averaged over independent pairs of samples of N(0, I), KID's mean is 0 within a few
        // standard errors; between N(0, I) and N(0.5, I) it is clearly positive.
        let same: Vec<f64> = (0..40)
            .map(|s| {
                mmd2_unbiased(
                    normal(30, 3, 0.0, 1.0, 2 * s).view(),
                    normal(30, 3, 0.0, 1.0, 2 * s + 1).view(),
                )
            })
            .collect();
        let mean = same.iter().sum::<f64>() / same.len() as f64;
        let se = (same.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
            / (same.len() - 1) as f64
            / same.len() as f64)
            .sqrt();
        assert!(mean.abs() < 3.0 * se, "mean {mean}, se {se}");
        let apart =
            kid(normal(200, 3, 0.0, 1.0, 7).view(), normal(200, 3, 0.5, 1.0, 8).view(), 20, 100, 0).unwrap();
        assert!(apart.kid > 10.0 * apart.kid_se && apart.kid > 0.0, "{apart:?}");
    }

    #[test]
    fn kid_is_deterministic_for_a_seed() {
        let (a, b) = (normal(80, 3, 0.0, 1.0, 1), normal(90, 3, 0.2, 1.0, 2));
        assert_eq!(kid(a.view(), b.view(), 10, 50, 3).unwrap(), kid(a.view(), b.view(), 10, 50, 3).unwrap());
        assert_ne!(kid(a.view(), b.view(), 10, 50, 3).unwrap(), kid(a.view(), b.view(), 10, 50, 4).unwrap());
    }

    #[test]
    fn precision_and_recall_are_one_for_identical_sets_and_zero_for_disjoint_clusters() {
        let x = normal(40, 3, 0.0, 1.0, 3);
        let pr = precision_recall(x.view(), x.view(), 3).unwrap();
        assert_eq!((pr.precision, pr.recall), (1.0, 1.0));
        let far = normal(40, 3, 100.0, 1.0, 4);
        let pr = precision_recall(x.view(), far.view(), 3).unwrap();
        assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
        // Mode collapse: generated samples all near one real point are precise but recall little.
        let collapsed = normal(40, 3, 0.0, 0.01, 5);
        let pr = precision_recall(x.view(), collapsed.view(), 3).unwrap();
        assert!(pr.precision > 0.9 && pr.recall < 0.3, "{pr:?}");
    }

    #[test]
    fn knn_radii_skip_the_point_itself() {
        let x = array![[0.0], [1.0], [3.0], [7.0]];
        // Squared distances to the 1st and 2nd nearest other points.
        assert_eq!(knn_radii(x.view(), 1), vec![1.0, 1.0, 4.0, 16.0]);
        assert_eq!(knn_radii(x.view(), 2), vec![9.0, 4.0, 9.0, 36.0]);
    }

    #[test]
    fn class_stats_count_classes_entropy_and_confidence() {
        let probs = array![[0.95, 0.05], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4]];
        let s = class_stats(probs.view());
        assert_eq!(s.class_hist, vec![2, 2]);
        assert!((s.class_entropy - 2f64.ln()).abs() < 1e-12);
        assert_eq!(s.frac_conf90, 0.5);
    }

    #[test]
    fn too_few_rows_are_refused_not_a_panic() {
        let one = normal(1, 3, 0.0, 1.0, 0);
        assert!(Gaussian::fit(one.view()).is_err());
        assert!(kid(one.view(), one.view(), 5, 10, 0).is_err());
        let three = normal(3, 3, 0.0, 1.0, 0);
        assert!(precision_recall(three.view(), three.view(), 3).is_err());
    }
}
