//! The core of the U-Net's self-attention for inference, fused per image:
//!
//! ```text
//! w[i, j] = softmax_j( scale · Σ_c q[c, i] k[c, j] )
//! o[c, i] = Σ_j w[i, j] v[c, j]
//! ```
//!
//! The unfused ops (`bmm_t`, `softmax`, `bmm_t`) write the whole `[N, HW, HW]` weight tensor,
//! then read it back twice: 9.8 MB per block at the `mnist` preset's 14x14 (batch 64), which
//! leaves the caches every time. Here one task per image computes 32 query rows of `w` at a
//! time into a buffer that stays in L1/L2, normalises them, and multiplies them into the output
//! at once. Without a tape there is nothing to keep for a backward pass; training uses the
//! unfused ops, whose gradients are checked.
//!
//! The terms of each element are summed in the same order as the unfused path (the same `gemm`
//! calls per block of 32 rows, the same softmax arithmetic), so the two agree to rounding; the
//! tests compare them.

use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::math::softmax_in_place;

/// Query rows per block of attention weights.
const QUERY_BLOCK: usize = 32;

/// `o[n] = v[n] · softmax(scale · q[n]ᵀ k[n])ᵀ` for each of `n` images, with `q`, `k`, `v` and
/// `o` each `[N, C, HW]` and the softmax over the last axis (the keys).
///
/// # Panics
/// If a slice does not have `n·c·hw` elements.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    n: usize,
    c: usize,
    hw: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    o: &mut [f32],
) {
    let len = n * c * hw;
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        assert_eq!(
            x.len(),
            len,
            "attention_forward: {name} has {} elements, expected n*c*hw = {n}*{c}*{hw}",
            x.len()
        );
    }
    assert_eq!(o.len(), len, "attention_forward: o has {} elements, expected n*c*hw = {n}*{c}*{hw}", o.len());
    if len == 0 {
        return;
    }
    let image = c * hw;
    o.par_chunks_mut(image).enumerate().for_each_init(
        || vec![0.0f32; QUERY_BLOCK * hw],
        |w, (i, o_i)| {
            let (q_i, k_i, v_i) =
                (&q[i * image..][..image], &k[i * image..][..image], &v[i * image..][..image]);
            for i0 in (0..hw).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(hw - i0);
                let w = &mut w[..rows * hw];
                // w[i, j] = scale · Σ_c q[c, i0 + i] k[c, j]: rows of qᵀ, read in place.
                let q_t = MatRef::new(&q_i[i0..], rows, c, 1, hw);
                gemm(scale, q_t, MatRef::row_major(k_i, c, hw), 0.0, MatMut::row_major(w, rows, hw));
                for row in w.chunks_mut(hw) {
                    softmax_in_place(row);
                }
                // o[c, i0 + i] = Σ_j v[c, j] w[i, j].
                let w_t = MatRef::row_major(w, rows, hw).t();
                gemm(1.0, MatRef::row_major(v_i, c, hw), w_t, 0.0, MatMut::new(&mut o_i[i0..], c, rows, hw));
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Tensor, Var};
    use proptest::prelude::*;
    use rand::Rng as _;

    fn random_vec(rng: &mut crate::Rng, len: usize, range: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-range..range)).collect()
    }

    /// The definition in f64: per image, the scores, their softmax over keys, the weighted sum.
    fn reference(n: usize, c: usize, hw: usize, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f64> {
        let mut o = vec![0.0f64; n * c * hw];
        for img in 0..n {
            let at = |x: &[f32], ch: usize, p: usize| x[(img * c + ch) * hw + p] as f64;
            for i in 0..hw {
                let scores: Vec<f64> = (0..hw)
                    .map(|j| scale as f64 * (0..c).map(|ch| at(q, ch, i) * at(k, ch, j)).sum::<f64>())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for ch in 0..c {
                    o[(img * c + ch) * hw + i] = (0..hw).map(|j| e[j] / total * at(v, ch, j)).sum();
                }
            }
        }
        o
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Up to 70 positions: several blocks of 32 query rows, the last one partial.
        #[test]
        fn matches_the_definition_in_f64(n in 1usize..=3, c in 1usize..=9, hw in 1usize..=70, seed in any::<u64>()) {
            let mut rng = crate::rng_from_seed(seed);
            let len = n * c * hw;
            let (q, k, v) = (random_vec(&mut rng, len, 2.0), random_vec(&mut rng, len, 2.0), random_vec(&mut rng, len, 1.0));
            let scale = 1.0 / (c as f32).sqrt();
            let mut o = vec![f32::NAN; len];
            attention_forward(n, c, hw, &q, &k, &v, scale, &mut o);
            let want = reference(n, c, hw, &q, &k, &v, scale);
            for (idx, (&got, &want)) in o.iter().zip(&want).enumerate() {
                // |o| ≤ max |v| ≤ 1: an absolute bound a few f32 roundings of the sums above it.
                prop_assert!((got as f64 - want).abs() <= 2e-5, "o[{idx}] = {got}, want {want}");
            }
        }

        /// The op agrees with the unfused ops it replaces at inference (`bmm_t`, `softmax`,
        /// `bmm_t`) to a few float roundings.
        #[test]
        fn agrees_with_the_unfused_ops(n in 1usize..=3, c in 1usize..=9, hw in 1usize..=70, seed in any::<u64>()) {
            let mut rng = crate::rng_from_seed(seed);
            let len = n * c * hw;
            let var = |rng: &mut crate::Rng| {
                Var::constant(Tensor::from_shape_vec(vec![n, c, hw], random_vec(rng, len, 2.0)).expect("shape"))
            };
            let (q, k, v) = (var(&mut rng), var(&mut rng), var(&mut rng));
            let scale = 1.0 / (c as f32).sqrt();
            let fused = Var::attention_inference(&q, &k, &v, scale);
            let unfused = v.bmm_t(&q.bmm_t(&k, true, false, scale).softmax(), false, true, 1.0);
            for (idx, (&a, &b)) in fused.value().iter().zip(unfused.value().iter()).enumerate() {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "o[{idx}]: fused {a}, unfused {b}");
            }
        }
    }
}
