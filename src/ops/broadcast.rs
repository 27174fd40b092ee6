//! Explicit broadcasting and its adjoint. No other op broadcasts implicitly.

use ndarray::{Axis, IxDyn};
use rayon::prelude::*;

use super::par::{filled_uninit, write_with, FILL_CHUNK};
use crate::kernels::math::sum_f64_lanes;

use crate::{Tensor, Var};

/// Sums `g` down to `shape` (the adjoint of broadcasting `shape` up to `g.shape()`): leading
/// axes are summed away, axes where `shape` has 1 are summed with the axis kept.
///
/// # Panics
/// If `shape` does not broadcast to `g.shape()`.
pub(crate) fn sum_to_shape(g: &Tensor, shape: &[usize]) -> Tensor {
    let lead = g
        .ndim()
        .checked_sub(shape.len())
        .unwrap_or_else(|| panic!("sum_to: {:?} has fewer axes than {:?}", g.shape(), shape));
    let mut out = g.clone();
    for _ in 0..lead {
        out = out.sum_axis(Axis(0));
    }
    for (ax, (&want, &have)) in shape.iter().zip(g.shape()[lead..].to_vec().iter()).enumerate() {
        if want == have {
            continue;
        }
        assert_eq!(want, 1, "sum_to: cannot reduce {:?} to {:?}", g.shape(), shape);
        out = out.sum_axis(Axis(ax)).insert_axis(Axis(ax));
    }
    out
}

fn broadcast_value(x: &Tensor, shape: &[usize]) -> Tensor {
    x.broadcast(IxDyn(shape))
        .unwrap_or_else(|| panic!("broadcast_to: {:?} does not broadcast to {:?}", x.shape(), shape))
        .to_owned()
}

impl Var {
    /// Broadcasts to `shape` by numpy's rules (align trailing axes; size-1 axes repeat; missing
    /// leading axes are added). Backward: [`Var::sum_to`] the input's shape.
    ///
    /// # Panics
    /// If the shapes are not compatible.
    pub fn broadcast_to(&self, shape: &[usize]) -> Var {
        let y = broadcast_value(self.value(), shape);
        let in_shape = self.shape().to_vec();
        Var::record([self], y, move |g, _| [Some(sum_to_shape(g, &in_shape))])
    }

    /// Sums down to `shape` (the adjoint of [`Var::broadcast_to`]). Backward: broadcast back.
    ///
    /// # Panics
    /// If `shape` does not broadcast to this value's shape.
    pub fn sum_to(&self, shape: &[usize]) -> Var {
        let y = sum_to_shape(self.value(), shape);
        let in_shape = self.shape().to_vec();
        Var::record([self], y, move |g, _| [Some(broadcast_value(g, &in_shape))])
    }

    /// `x[n, c, …] + t[n, c]`: one value per (sample, channel) added to every position of its
    /// plane (the timestep embedding added inside a residual block). The same value as
    /// `x + t.reshape([N, C, 1, …]).broadcast_to(x.shape())` without the broadcast tensor.
    /// Backward: `dx = g`, `dt[n, c] = Σ_positions g[n, c, …]` (summed in f64).
    ///
    /// # Panics
    /// If `x` has fewer than 2 axes or `t` is not `[N, C]`.
    pub fn add_per_channel(&self, t: &Var) -> Var {
        let shape = self.shape().to_vec();
        assert!(
            shape.len() >= 2 && t.shape() == &shape[..2],
            "add_per_channel: t {:?} for x {shape:?}; expected [N, C]",
            t.shape()
        );
        let plane: usize = shape[2..].iter().product();
        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("as_standard_layout above");
        let ts = t.value().as_standard_layout();
        let ts = ts.as_slice().expect("as_standard_layout above");
        // Whole planes per task, about FILL_CHUNK elements; y = x + t[plane] written once.
        let planes = (FILL_CHUNK / plane.max(1)).max(1);
        // SAFETY: write_with covers each whole plane, and the planes cover the chunk.
        let y = unsafe {
            filled_uninit(xs.len(), planes * plane.max(1), |i, out| {
                let src = &xs[i * planes * plane..];
                for (j, (o, s)) in out.chunks_mut(plane.max(1)).zip(src.chunks(plane.max(1))).enumerate() {
                    let tv = ts[i * planes + j];
                    write_with(o, |k| s[k] + tv);
                }
            })
        };
        let y = Tensor::from_shape_vec(shape.as_slice(), y).expect("y holds one value per element of x");
        let t_shape = t.shape().to_vec();
        Var::record_owned([self, t], y, move |g, needs| {
            let dt = needs[1].then(|| {
                let gs = g.as_standard_layout();
                let gs = gs.as_slice().expect("as_standard_layout above");
                let sums: Vec<f32> = if plane == 0 {
                    vec![0.0; t_shape.iter().product()]
                } else {
                    gs.par_chunks(plane).map(|p| sum_f64_lanes(p, |v| v as f64) as f32).collect()
                };
                Tensor::from_shape_vec(t_shape.as_slice(), sums).expect("one sum per plane of g: N·C values")
            });
            [needs[0].then_some(g), dt]
        })
    }

    /// `x[n, c, …] · (1 + s[n, c]) + b[n, c]`: the scale-shift ("FiLM") time conditioning of
    /// improved-diffusion's `use_scale_shift_norm` and diffusers' `scale_shift` residual blocks,
    /// one scale and one shift per (sample, channel). Backward: `dx = g·(1 + s)`,
    /// `ds[n, c] = Σ g·x`, `db[n, c] = Σ g` over the positions (summed in f64).
    ///
    /// # Panics
    /// If `x` has fewer than 2 axes or `s`, `b` are not `[N, C]`.
    pub fn scale_shift_per_channel(&self, s: &Var, b: &Var) -> Var {
        let shape = self.shape().to_vec();
        assert!(
            shape.len() >= 2 && s.shape() == &shape[..2] && b.shape() == &shape[..2],
            "scale_shift_per_channel: s {:?}, b {:?} for x {shape:?}; expected [N, C]",
            s.shape(),
            b.shape()
        );
        let plane: usize = shape[2..].iter().product::<usize>().max(1);
        let x = self.value().as_standard_layout().into_owned();
        let ss = s.value().as_standard_layout().into_owned();
        let bs = b.value().as_standard_layout().into_owned();
        let (xs, sv, bv) = (
            x.as_slice().expect("owned standard layout"),
            ss.as_slice().expect("owned standard layout"),
            bs.as_slice().expect("owned standard layout"),
        );
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(plane).zip(xs.par_chunks(plane)).enumerate().for_each(|(i, (o, xp))| {
            let (m, a) = (1.0 + sv[i], bv[i]);
            for (o, &v) in o.iter_mut().zip(xp) {
                *o = v * m + a;
            }
        });
        let y = Tensor::from_shape_vec(shape.as_slice(), y).expect("y holds one value per element of x");
        let nc_shape = s.shape().to_vec();
        Var::record([self, s, b], y, move |g, needs| {
            let g = g.as_standard_layout();
            let gs = g.as_slice().expect("as_standard_layout above");
            let xs = x.as_slice().expect("owned standard layout");
            let sv = ss.as_slice().expect("owned standard layout");
            let dx = needs[0].then(|| {
                let mut dx = vec![0f32; gs.len()];
                dx.par_chunks_mut(plane).zip(gs.par_chunks(plane)).enumerate().for_each(|(i, (d, gp))| {
                    let m = 1.0 + sv[i];
                    for (d, &gv) in d.iter_mut().zip(gp) {
                        *d = gv * m;
                    }
                });
                Tensor::from_shape_vec(x.shape(), dx).expect("dx has x's size")
            });
            let per_plane = |f: &(dyn Fn(usize, f32) -> f64 + Sync)| -> Tensor {
                let sums: Vec<f32> = gs
                    .par_chunks(plane)
                    .enumerate()
                    .map(|(i, gp)| {
                        gp.iter().enumerate().map(|(k, &gv)| f(i * plane + k, gv)).sum::<f64>() as f32
                    })
                    .collect();
                Tensor::from_shape_vec(nc_shape.as_slice(), sums).expect("one sum per plane: N·C values")
            };
            let ds = needs[1].then(|| per_plane(&|k, gv| gv as f64 * xs[k] as f64));
            let db = needs[2].then(|| per_plane(&|_, gv| gv as f64));
            [dx, ds, db]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn broadcast_and_sum_to_backward_match_finite_differences(
            n in 1usize..4, c in 1usize..4, h in 1usize..4, seed in 0u64..1000
        ) {
            // Per-channel bias [C, 1, 1] onto [N, C, H, H], and a row vector onto a matrix.
            check(&[randn(&[c, 1, 1], seed)], seed, |v| v[0].broadcast_to(&[n, c, h, h]));
            check(&[randn(&[h], seed)], seed, |v| v[0].broadcast_to(&[n, h]));
            check(&[randn(&[n, c, h], seed)], seed, |v| v[0].sum_to(&[c, 1]));
            check(&[randn(&[n, c, h], seed)], seed, |v| v[0].sum_to(&[n, c, h]));
            check(&[randn(&[n, c, h, h + 1], seed), randn(&[n, c], seed + 1)], seed,
                |v| v[0].add_per_channel(&v[1]));
            check(&[randn(&[n, c, h, h + 1], seed), randn(&[n, c], seed + 1), randn(&[n, c], seed + 2)], seed,
                |v| v[0].scale_shift_per_channel(&v[1], &v[2]));
        }
    }

    #[test]
    fn sum_to_is_the_adjoint_of_broadcast_to() {
        // <broadcast(x), y> == <x, sum_to(y)>
        let x = randn(&[3, 1], 1);
        let y = randn(&[2, 3, 4], 2);
        let bx = super::broadcast_value(&x, &[2, 3, 4]);
        let sy = super::sum_to_shape(&y, &[3, 1]);
        let lhs: f32 = (&bx * &y).sum();
        let rhs: f32 = (&x * &sy).sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
    }

    #[test]
    fn add_per_channel_equals_the_broadcast_add() {
        let (x, t) = (crate::Var::constant(randn(&[2, 3, 4, 5], 3)), crate::Var::constant(randn(&[2, 3], 4)));
        let want = x.add(&t.reshape(&[2, 3, 1, 1]).broadcast_to(&[2, 3, 4, 5]));
        assert_eq!(x.add_per_channel(&t).value(), want.value());
    }

    #[test]
    fn scale_shift_per_channel_equals_the_broadcast_expression() {
        let x = crate::Var::constant(randn(&[2, 3, 4, 5], 3));
        let (s, b) = (crate::Var::constant(randn(&[2, 3], 4)), crate::Var::constant(randn(&[2, 3], 5)));
        let full = |t: &crate::Var| t.reshape(&[2, 3, 1, 1]).broadcast_to(&[2, 3, 4, 5]);
        let want = x.mul(&full(&s.add_scalar(1.0))).add(&full(&b));
        let got = x.scale_shift_per_channel(&s, &b);
        for (g, w) in got.value().iter().zip(want.value().iter()) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
