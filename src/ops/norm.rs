//! Group normalisation (Wu & He 2018) with affine parameters, as in the DDPM U-Net.

use ndarray::Axis;
use rayon::prelude::*;

use crate::{Tensor, Var};

/// What the backward pass of a group norm needs: the normalised input and 1/σ per group.
struct Saved {
    x_hat: Tensor,
    inv_std: Vec<f32>,
}

impl Var {
    /// Group norm over `[N, C, ...]`: channels are split into `groups` groups; each (sample,
    /// group) is normalised by its own mean and biased variance over its channels and spatial
    /// positions, then scaled and shifted per channel:
    /// `y = γ_c · (x − μ_{n,g}) / √(σ²_{n,g} + eps) + β_c`.
    /// `gamma`, `beta`: `[C]`.
    ///
    /// # Panics
    /// If `groups` does not divide C, or `gamma`/`beta` are not `[C]`.
    pub fn group_norm(&self, gamma: &Var, beta: &Var, groups: usize, eps: f32) -> Var {
        let shape = self.shape().to_vec();
        assert!(shape.len() >= 2, "group_norm: input {shape:?} has no channel axis");
        let (n, c) = (shape[0], shape[1]);
        assert!(groups > 0 && c % groups == 0, "group_norm: {groups} groups do not divide {c} channels");
        assert_eq!(gamma.shape(), &[c], "group_norm: gamma {:?} for {c} channels", gamma.shape());
        assert_eq!(beta.shape(), &[c], "group_norm: beta {:?} for {c} channels", beta.shape());
        let spatial: usize = shape[2..].iter().product();
        let group_len = (c / groups) * spatial;

        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let mut x_hat = vec![0.0f32; xs.len()];
        let mut inv_std = vec![0.0f32; n * groups];
        x_hat
            .par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len))
            .zip(inv_std.par_iter_mut())
            .for_each(|((out, inp), inv)| {
                // Two passes in f64 for an accurate variance.
                let mean = inp.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
                let var = inp.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
                let is = 1.0 / (var + eps as f64).sqrt();
                *inv = is as f32;
                for (o, &v) in out.iter_mut().zip(inp) {
                    *o = ((v as f64 - mean) * is) as f32;
                }
            });
        let x_hat = Tensor::from_shape_vec(shape.as_slice(), x_hat).expect("same size as input");

        let per_channel = |t: &mut Tensor, g: &Tensor, b: &Tensor| {
            for mut sample in t.outer_iter_mut() {
                for (ci, mut chan) in sample.outer_iter_mut().enumerate() {
                    let (gc, bc) = (g[ci], b[ci]);
                    chan.mapv_inplace(|v| v * gc + bc);
                }
            }
        };
        let mut y = x_hat.clone();
        per_channel(&mut y, gamma.value(), beta.value());

        let saved = Saved { x_hat, inv_std };
        let gam = gamma.value_rc();
        Var::record([self, gamma, beta], y, move |g, needs| {
            let Saved { x_hat, inv_std } = saved;
            // dγ_c = Σ_{n,hw} g·x̂ ; dβ_c = Σ_{n,hw} g.
            let reduce = |t: Tensor| -> Tensor {
                let mut t = t;
                while t.ndim() > 2 {
                    t = t.sum_axis(Axis(2));
                }
                t.sum_axis(Axis(0))
            };
            let dgamma = needs[1].then(|| reduce(g * &x_hat));
            let dbeta = needs[2].then(|| reduce(g.clone()));
            let dx = needs[0].then(|| {
                // dx̂ = g·γ; dx = (1/σ)(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) per (n, group).
                let mut dxh = g.clone();
                for mut sample in dxh.outer_iter_mut() {
                    for (ci, mut chan) in sample.outer_iter_mut().enumerate() {
                        let gc = gam[ci];
                        chan.mapv_inplace(|v| v * gc);
                    }
                }
                let dxh = dxh.as_standard_layout().into_owned();
                let xh = x_hat.as_standard_layout();
                let mut dx = vec![0.0f32; dxh.len()];
                dx.par_chunks_mut(group_len)
                    .zip(dxh.as_slice().expect("standard").par_chunks(group_len))
                    .zip(xh.as_slice().expect("standard").par_chunks(group_len))
                    .zip(inv_std.par_iter())
                    .for_each(|(((out, d), xh), &is)| {
                        let m = group_len as f64;
                        let mean_d = d.iter().map(|&v| v as f64).sum::<f64>() / m;
                        let mean_dx = d.iter().zip(xh).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / m;
                        for ((o, &dv), &xv) in out.iter_mut().zip(d).zip(xh) {
                            *o = (is as f64 * (dv as f64 - mean_d - xv as f64 * mean_dx)) as f32;
                        }
                    });
                Tensor::from_shape_vec(dxh.shape(), dx).expect("same size")
            });
            [dx, dgamma, dbeta]
        })
    }
}


#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn, uniform};
    use crate::Var;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

        #[test]
        fn group_norm_backward_matches_finite_differences(
            n in 1usize..3, groups in 1usize..4, per in 1usize..3, h in 1usize..4, w in 1usize..4, seed in 0u64..1000
        ) {
            let c = groups * per;
            // A group of one element normalises to 0 and has no gradient; keep ≥ 2 elements.
            prop_assume!(per * h * w >= 2);
            let x = randn(&[n, c, h, w], seed).mapv(|v| 2.0 * v + 0.5);
            let gamma = uniform(&[c], 0.5, 1.5, seed + 1);
            let beta = randn(&[c], seed + 2);
            check(&[x, gamma, beta], seed, |v| v[0].group_norm(&v[1], &v[2], groups, 1e-5));
        }
    }

    #[test]
    fn group_norm_output_has_zero_mean_unit_variance_per_group() {
        let x = Var::constant(randn(&[2, 4, 3, 3], 9).mapv(|v| 3.0 * v + 1.0));
        let gamma = Var::constant(ndarray::Array1::ones(4).into_dyn());
        let beta = Var::constant(ndarray::Array1::zeros(4).into_dyn());
        let y = x.group_norm(&gamma, &beta, 2, 1e-6);
        for n in 0..2 {
            for g in 0..2 {
                let grp = y.value().slice(ndarray::s![n, 2 * g..2 * g + 2, .., ..]).to_owned();
                let m = grp.mean().unwrap();
                let v = grp.mapv(|a| (a - m) * (a - m)).mean().unwrap();
                assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "mean {m}, var {v}");
            }
        }
    }
}
