//! The core of the U-Net's self-attention, fused per image, and its gradient:
//!
//! ```text
//! w[i, j] = softmax_j( scale · Σ_c q[c, i] k[c, j] )
//! o[c, i] = Σ_j w[i, j] v[c, j]
//! ```
//!
//! Unfused (`bmm_t`, `softmax`, `bmm_t`), the ops write the whole `[N, HW, HW]` weight tensor,
//! then read it back: 9.8 MB per block at the `mnist` preset's 14x14 (batch 64), which leaves
//! the caches every time, and the backward pass writes and reads three more such tensors. Here
//! one task per image computes 32 query rows of `w` at a time into a buffer that stays in
//! L1/L2, normalises them and multiplies them into the output at once. The backward pass
//! recomputes those rows of `w` rather than keeping them (as flash attention does), so nothing
//! of size `HW²` outlives a task.
//!
//! Gradients, per image, with `dO` the output gradient and `dS` the score gradient:
//!
//! ```text
//! dv = dO · w                   dw = dOᵀ · v
//! dS[i, j] = w[i, j]·(dw[i, j] − Σ_l dw[i, l] w[i, l])      (softmax backward)
//! dq = scale · k · dSᵀ          dk = scale · q · dS
//! ```
//!
//! Each image's sums run in a fixed order (query blocks in turn), so results do not depend on
//! the number of threads.

use rayon::prelude::*;

use super::gemm::{gemm, gemm_packed_a, MatMut, MatRef};
use super::math::{softmax_backward_in_place, softmax_columns_in_place, softmax_in_place};
use super::packed::{gemm_packed, Init, PackedA};

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
    forward_packed(c, hw, q, k, v, scale, o);
}

/// [`attention_forward`] on the kernel of `packed.rs` (every level's lanes give the same bits),
/// the weights kept transposed so both products read one operand in place. Per image, `scale·kᵀ` (`[HW, C]`) and `v`
/// (`[C, HW]`) are packed once; per block of 32 queries, `wᵀ = (scale·kᵀ)·q[:, block]` is a
/// `[HW, 32]` block (keys down, queries across), softmax runs down its columns, and
/// `o[:, block] = v·wᵀ`. The sums run in a fixed order per image.
fn forward_packed(c: usize, hw: usize, q: &[f32], k: &[f32], v: &[f32], scale: f32, o: &mut [f32]) {
    let image = c * hw;
    o.par_chunks_mut(image).enumerate().for_each_init(
        || vec![0.0f32; hw * QUERY_BLOCK],
        |wt, (i, o_i)| {
            let (q_i, k_i, v_i) =
                (&q[i * image..][..image], &k[i * image..][..image], &v[i * image..][..image]);
            // A[j, c] = scale·k[c, j]; B[c, i] = q[c, i0 + i], read in place.
            let mut k_t = PackedA::new(k_i, hw, c, 1, hw);
            k_t.data.iter_mut().for_each(|x| *x *= scale);
            let v_p = PackedA::new(v_i, c, hw, hw, 1);
            for i0 in (0..hw).step_by(QUERY_BLOCK) {
                let cols = QUERY_BLOCK.min(hw - i0);
                gemm_packed(&k_t, &q_i[i0..], hw, cols, wt, QUERY_BLOCK, Init::Zero);
                // Columns past `cols` hold the previous block's weights (or zeros): finite,
                // normalised along with the rest and never read.
                softmax_columns_in_place(wt, hw, QUERY_BLOCK);
                gemm_packed(&v_p, wt, QUERY_BLOCK, cols, &mut o_i[i0..], hw, Init::Zero);
            }
        },
    );
}

/// Gradients of [`attention_forward`] from the output gradient `d_o`: `(dq, dk, dv)`, each
/// `[N, C, HW]` like the inputs (overwritten).
///
/// # Panics
/// If a slice does not have `n·c·hw` elements.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    n: usize,
    c: usize,
    hw: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let len = n * c * hw;
    for (name, x) in [("q", q), ("k", k), ("v", v), ("d_o", d_o)] {
        assert_eq!(
            x.len(),
            len,
            "attention_backward: {name} has {} elements, expected n*c*hw = {n}*{c}*{hw}",
            x.len()
        );
    }
    for (name, x) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
        assert_eq!(
            x.len(),
            len,
            "attention_backward: {name} has {} elements, expected n*c*hw = {n}*{c}*{hw}",
            x.len()
        );
    }
    if len == 0 {
        return;
    }
    let image = c * hw;
    dq.par_chunks_mut(image)
        .zip(dk.par_chunks_mut(image))
        .zip(dv.par_chunks_mut(image))
        .enumerate()
        .for_each_init(
            || (vec![0.0f32; QUERY_BLOCK * hw], vec![0.0f32; QUERY_BLOCK * hw]),
            |(w, dw), (i, ((dq_i, dk_i), dv_i))| {
                let [q_i, k_i, v_i, do_i] = [q, k, v, d_o].map(|x| &x[i * image..][..image]);
                // scale·k, the left operand of every block's dq: packed once per image.
                let mut k_scaled = PackedA::new(k_i, c, hw, hw, 1);
                k_scaled.scale(scale);
                for i0 in (0..hw).step_by(QUERY_BLOCK) {
                    let rows = QUERY_BLOCK.min(hw - i0);
                    let (w, dw) = (&mut w[..rows * hw], &mut dw[..rows * hw]);
                    // This block's rows of w, as the forward pass computed them.
                    let q_t = MatRef::new(&q_i[i0..], rows, c, 1, hw);
                    gemm(scale, q_t, MatRef::row_major(k_i, c, hw), 0.0, MatMut::row_major(w, rows, hw));
                    for row in w.chunks_mut(hw) {
                        softmax_in_place(row);
                    }
                    // The first block writes dv and dk, later ones add to them.
                    let beta = if i0 == 0 { 0.0 } else { 1.0 };
                    // dv[c, j] += Σ_i dO[c, i0 + i] w[i, j].
                    let do_blk = MatRef::new(&do_i[i0..], c, rows, hw, 1);
                    gemm(1.0, do_blk, MatRef::row_major(w, rows, hw), beta, MatMut::row_major(dv_i, c, hw));
                    // dw[i, j] = Σ_c dO[c, i0 + i] v[c, j], then the softmax backward in place.
                    gemm(
                        1.0,
                        do_blk.t(),
                        MatRef::row_major(v_i, c, hw),
                        0.0,
                        MatMut::row_major(dw, rows, hw),
                    );
                    for (d_row, w_row) in dw.chunks_mut(hw).zip(w.chunks(hw)) {
                        softmax_backward_in_place(d_row, w_row);
                    }
                    // dq[c, i0 + i] = scale Σ_j k[c, j] dS[i, j].
                    let ds_t = MatRef::row_major(dw, rows, hw).t();
                    gemm_packed_a(&k_scaled, ds_t, 0.0, MatMut::new(&mut dq_i[i0..], c, rows, hw));
                    // dk[c, j] += scale Σ_i q[c, i0 + i] dS[i, j].
                    let q_blk = MatRef::new(&q_i[i0..], c, rows, hw, 1);
                    gemm(scale, q_blk, MatRef::row_major(dw, rows, hw), beta, MatMut::row_major(dk_i, c, hw));
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{check, randn};
    use crate::{Tape, Tensor, Var};
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
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Gradients of all three inputs against central finite differences; up to 40 positions
        /// (two blocks of query rows).
        #[test]
        fn gradients_match_finite_differences(n in 1usize..=2, c in 1usize..=4, hw in 1usize..=40, seed in 0u64..1000) {
            let shape = [n, c, hw];
            let inputs = [randn(&shape, seed), randn(&shape, seed + 1), randn(&shape, seed + 2)];
            check(&inputs, seed, |v| Var::attention(&v[0], &v[1], &v[2], 0.7));
        }

        /// Gradients equal the unfused ops' (whose gradients are checked on their own) to a few
        /// float roundings, at sizes where finite differences would be slow.
        #[test]
        fn gradients_agree_with_the_unfused_ops(n in 1usize..=2, c in 1usize..=9, hw in 33usize..=70, seed in any::<u64>()) {
            let shape = [n, c, hw];
            let grads = |fused: bool| {
                let tape = Tape::new();
                let [q, k, v] = [0, 1, 2].map(|i| tape.var(randn(&shape, seed.wrapping_add(i))));
                let o = if fused {
                    Var::attention(&q, &k, &v, 0.5)
                } else {
                    v.bmm_t(&q.bmm_t(&k, true, false, 0.5).softmax(), false, true, 1.0)
                };
                // A loss that weighs every output differently.
                let weights = randn(&shape, seed.wrapping_add(3));
                let loss = o.mul(&Var::constant(weights)).sum();
                let g = loss.backward();
                [q, k, v].map(|x| g.get(&x).expect("gradient").clone())
            };
            let (fused, unfused) = (grads(true), grads(false));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused.iter().zip(&unfused)) {
                let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
                for (idx, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    prop_assert!((x - y).abs() <= 1e-5 * scale, "d{name}[{idx}]: fused {x}, unfused {y}");
                }
            }
        }
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

        /// The op agrees with the unfused ops it replaces (`bmm_t`, `softmax`, `bmm_t`) to a few
        /// float roundings.
        #[test]
        fn agrees_with_the_unfused_ops(n in 1usize..=3, c in 1usize..=9, hw in 1usize..=70, seed in any::<u64>()) {
            let mut rng = crate::rng_from_seed(seed);
            let len = n * c * hw;
            let var = |rng: &mut crate::Rng| {
                Var::constant(Tensor::from_shape_vec(vec![n, c, hw], random_vec(rng, len, 2.0)).expect("shape"))
            };
            let (q, k, v) = (var(&mut rng), var(&mut rng), var(&mut rng));
            let scale = 1.0 / (c as f32).sqrt();
            let fused = Var::attention(&q, &k, &v, scale);
            let unfused = v.bmm_t(&q.bmm_t(&k, true, false, scale).softmax(), false, true, 1.0);
            for (idx, (&a, &b)) in fused.value().iter().zip(unfused.value().iter()).enumerate() {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "o[{idx}]: fused {a}, unfused {b}");
            }
        }
    }
}
