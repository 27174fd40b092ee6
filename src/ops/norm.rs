//! Group normalisation (Wu & He 2018) with affine parameters, as in the DDPM U-Net, and the
//! same followed by SiLU in one pass (every residual block runs GN → SiLU twice).

use rayon::prelude::*;

use super::elementwise::sigmoid;
use crate::{Tensor, Var};

/// What follows the normalisation inside the fused kernel.
#[derive(Clone, Copy, PartialEq)]
enum Activation {
    Identity,
    Silu,
}

impl Activation {
    #[inline]
    fn apply(self, z: f32) -> f32 {
        match self {
            Activation::Identity => z,
            Activation::Silu => z * sigmoid(z),
        }
    }

    #[inline]
    fn derivative(self, z: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Silu => {
                let s = sigmoid(z);
                s * (1.0 + z * (1.0 - s))
            }
        }
    }
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
        group_norm_act(self, gamma, beta, groups, eps, Activation::Identity)
    }

    /// `SiLU(group_norm(x))` in one pass: the same value as `x.group_norm(..).silu()`, without
    /// the intermediate tensor.
    ///
    /// # Panics
    /// As [`Var::group_norm`].
    pub fn group_norm_silu(&self, gamma: &Var, beta: &Var, groups: usize, eps: f32) -> Var {
        group_norm_act(self, gamma, beta, groups, eps, Activation::Silu)
    }
}

fn group_norm_act(x: &Var, gamma: &Var, beta: &Var, groups: usize, eps: f32, act: Activation) -> Var {
    let shape = x.shape().to_vec();
    assert!(shape.len() >= 2, "group_norm: input {shape:?} has no channel axis");
    let c = shape[1];
    assert!(groups > 0 && c % groups == 0, "group_norm: {groups} groups do not divide {c} channels");
    assert_eq!(gamma.shape(), &[c], "group_norm: gamma {:?} for {c} channels", gamma.shape());
    assert_eq!(beta.shape(), &[c], "group_norm: beta {:?} for {c} channels", beta.shape());
    let spatial: usize = shape[2..].iter().product();
    let cpg = c / groups;
    let group_len = cpg * spatial;
    if group_len == 0 {
        return Var::record([x, gamma, beta], x.value().clone(), |g, _| [Some(g.clone()), None, None]);
    }
    let keep = x.requires_grad() || gamma.requires_grad() || beta.requires_grad();

    let xs = x.value().as_slice().expect("values are contiguous");
    let (gs, bs) =
        (gamma.value().as_slice().expect("contiguous"), beta.value().as_slice().expect("contiguous"));
    let mut y = vec![0.0f32; xs.len()];
    let mut x_hat = if keep { vec![0.0f32; xs.len()] } else { vec![] };
    let mut inv_std = vec![0.0f32; xs.len() / group_len];
    let body = |k: usize, inp: &[f32], out: &mut [f32], xh: Option<&mut [f32]>, inv: &mut f32| {
        // Two passes in f64 for an accurate variance.
        let mean = inp.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
        let var = inp.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
        let is = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        *inv = is;
        let c0 = (k % groups) * cpg;
        for j in 0..cpg {
            let (gc, bc) = (gs[c0 + j], bs[c0 + j]);
            let r = j * spatial..(j + 1) * spatial;
            for (o, &v) in out[r.clone()].iter_mut().zip(&inp[r]) {
                *o = act.apply(gc * ((v - mean) * is) + bc);
            }
        }
        if let Some(xh) = xh {
            for (h, &v) in xh.iter_mut().zip(inp) {
                *h = (v - mean) * is;
            }
        }
    };
    if keep {
        y.par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len))
            .zip(x_hat.par_chunks_mut(group_len))
            .zip(inv_std.par_iter_mut())
            .enumerate()
            .for_each(|(k, (((out, inp), xh), inv))| body(k, inp, out, Some(xh), inv));
    } else {
        y.par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len))
            .zip(inv_std.par_iter_mut())
            .enumerate()
            .for_each(|(k, ((out, inp), inv))| body(k, inp, out, None, inv));
    }
    let y = Tensor::from_shape_vec(shape.as_slice(), y).expect("same size as input");
    if !keep {
        return Var::constant(y);
    }

    let (gam, bet) = (gamma.value_rc(), beta.value_rc());
    Var::record([x, gamma, beta], y, move |g, needs| {
        let gs = g.as_slice().expect("gradients are contiguous");
        let (gam, bet) = (gam.as_slice().expect("contiguous"), bet.as_slice().expect("contiguous"));
        let mut dx = vec![0.0f32; gs.len()];
        // Per chunk (sample, group): partial dγ, dβ for its channels, summed in chunk order below.
        let mut partial = vec![0.0f64; 2 * gs.len() / spatial];
        dx.par_chunks_mut(group_len)
            .zip(gs.par_chunks(group_len))
            .zip(x_hat.par_chunks(group_len))
            .zip(inv_std.par_iter())
            .zip(partial.par_chunks_mut(2 * cpg))
            .enumerate()
            .for_each(|(k, ((((dxo, gk), xh), &is), part))| {
                let c0 = (k % groups) * cpg;
                // dz = g·act'(z) with z = γ x̂ + β; dx̂ = dz·γ.
                let (mut sum_d, mut sum_dx) = (0.0f64, 0.0f64);
                for j in 0..cpg {
                    let (gc, bc) = (gam[c0 + j], bet[c0 + j]);
                    let (mut dg, mut db) = (0.0f64, 0.0f64);
                    let r = j * spatial..(j + 1) * spatial;
                    for ((d, &gv), &h) in dxo[r.clone()].iter_mut().zip(&gk[r.clone()]).zip(&xh[r]) {
                        let dz = gv * act.derivative(gc * h + bc);
                        dg += (dz * h) as f64;
                        db += dz as f64;
                        let dxh = dz * gc;
                        *d = dxh;
                        sum_d += dxh as f64;
                        sum_dx += (dxh * h) as f64;
                    }
                    part[2 * j] = dg;
                    part[2 * j + 1] = db;
                }
                // dx = (1/σ)(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
                let m = group_len as f64;
                let (mean_d, mean_dx) = ((sum_d / m) as f32, (sum_dx / m) as f32);
                for (d, &h) in dxo.iter_mut().zip(xh) {
                    *d = is * (*d - mean_d - h * mean_dx);
                }
            });
        let n = gs.len() / (c * spatial);
        let reduce = |which: usize| -> Tensor {
            let mut out = vec![0.0f64; c];
            for s in 0..n {
                for ch in 0..c {
                    out[ch] += partial[2 * (s * c + ch) + which];
                }
            }
            Tensor::from_shape_vec(vec![c], out.into_iter().map(|v| v as f32).collect()).expect("[C]")
        };
        let dx = needs[0].then(|| Tensor::from_shape_vec(g.shape(), dx).expect("same size"));
        [dx, needs[1].then(|| reduce(0)), needs[2].then(|| reduce(1))]
    })
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
            check(&[x.clone(), gamma.clone(), beta.clone()], seed, |v| v[0].group_norm(&v[1], &v[2], groups, 1e-5));
            check(&[x, gamma, beta], seed, |v| v[0].group_norm_silu(&v[1], &v[2], groups, 1e-5));
        }
    }

    #[test]
    fn fused_silu_equals_the_composition() {
        let x = Var::constant(randn(&[2, 6, 3, 3], 4));
        let g = Var::constant(uniform(&[6], 0.5, 1.5, 5));
        let b = Var::constant(randn(&[6], 6));
        let a = x.group_norm_silu(&g, &b, 3, 1e-6);
        let c = x.group_norm(&g, &b, 3, 1e-6).silu();
        let err = a.value().iter().zip(c.value().iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-6, "{err}");
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
