//! 2-D convolution and nearest-neighbour upsampling on `[N, C, H, W]` values. The loops live
//! in [`crate::kernels`]; this file checks shapes and wires forward to backward.

use rayon::prelude::*;

use super::par::{written_by, zeroed};
use crate::kernels::math::sum_f64_lanes;
use crate::kernels::{
    conv2d_backward_input_uninit, conv2d_backward_weight, conv2d_forward_plus,
    upsample2x_conv3x3_forward_uninit, upsample_nearest2x_backward, upsample_nearest2x_uninit, Conv2dGeom,
    ConvPlus, PackedWeights,
};
use crate::{Tensor, Var};

/// Zero padding on each side of a 2-D convolution's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding {
    /// The same padding `p` on all four sides (PyTorch's `padding=p`).
    pub fn same(p: usize) -> Self {
        Self { top: p, bottom: p, left: p, right: p }
    }

    /// No padding.
    pub fn zero() -> Self {
        Self::same(0)
    }
}

fn contiguous(t: &Tensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.iter().copied().collect()),
    }
}

impl Var {
    /// 2-D cross-correlation (PyTorch's `conv2d`): x `[N, C_in, H, W]`, weight
    /// `[C_out, C_in, kh, kw]`, optional bias `[C_out]`, output `[N, C_out, H_out, W_out]` with
    /// `H_out = (H + top + bottom − kh) / stride + 1` (likewise W).
    ///
    /// # Panics
    /// On mismatched shapes, stride 0, or a kernel larger than the padded input.
    pub fn conv2d(&self, weight: &Var, bias: Option<&Var>, stride: usize, pad: Padding) -> Var {
        self.conv2d_plus(weight, bias, None, None, stride, pad)
    }

    /// [`Var::conv2d`] with two more optional additions, fused into the convolution:
    /// `y = conv2d(x, weight, bias) + image_bias[:, :, None, None] + residual`, with
    /// `image_bias: [N, C_out]` (the U-Net's timestep embedding after a residual block's first
    /// convolution) and `residual` of the output's shape (the skip connection after its second).
    /// The same value as the separate ops, to rounding, without their passes over memory.
    ///
    /// # Panics
    /// As [`Var::conv2d`], and if `image_bias` is not `[N, C_out]` or `residual` not the
    /// output's shape.
    pub fn conv2d_plus(
        &self,
        weight: &Var,
        bias: Option<&Var>,
        image_bias: Option<&Var>,
        residual: Option<&Var>,
        stride: usize,
        pad: Padding,
    ) -> Var {
        let (xs, ws) = (self.shape(), weight.shape());
        assert!(xs.len() == 4 && ws.len() == 4, "conv2d: x {xs:?}, weight {ws:?} must be 4-D");
        assert_eq!(xs[1], ws[1], "conv2d: x {xs:?} has {} channels, weight {ws:?} expects {}", xs[1], ws[1]);
        assert!(stride > 0, "conv2d: stride 0");
        assert!(
            xs[2] + pad.top + pad.bottom >= ws[2] && xs[3] + pad.left + pad.right >= ws[3],
            "conv2d: kernel {ws:?} larger than padded input {xs:?} with {pad:?}"
        );
        if let Some(b) = bias {
            assert_eq!(b.shape(), &[ws[0]], "conv2d: bias {:?} for weight {ws:?}", b.shape());
        }
        let g = Conv2dGeom {
            n: xs[0],
            c_in: xs[1],
            h: xs[2],
            w: xs[3],
            c_out: ws[0],
            kh: ws[2],
            kw: ws[3],
            stride,
            pad_top: pad.top,
            pad_bottom: pad.bottom,
            pad_left: pad.left,
            pad_right: pad.right,
        };
        let out_shape = [g.n, g.c_out, g.out_h(), g.out_w()];
        if let Some(t) = image_bias {
            assert_eq!(
                t.shape(),
                &[g.n, g.c_out],
                "conv2d: image bias {:?} for output {out_shape:?}",
                t.shape()
            );
        }
        if let Some(r) = residual {
            assert_eq!(r.shape(), &out_shape, "conv2d: residual {:?} for output {out_shape:?}", r.shape());
        }
        let y = {
            let x = contiguous(self.value());
            let w = contiguous(weight.value());
            let b = bias.map(|b| contiguous(b.value()));
            let t = image_bias.map(|t| contiguous(t.value()));
            let r = residual.map(|r| contiguous(r.value()));
            let plus = ConvPlus { bias: b.as_deref(), image_bias: t.as_deref(), residual: r.as_deref() };
            let kept = weight.derived(PackedWeights::new);
            // SAFETY: conv2d_forward_plus writes every output element.
            unsafe {
                written_by(out_shape.iter().product(), |y| {
                    conv2d_forward_plus(&g, &x, &w, kept.as_deref(), plus, y)
                })
            }
        };
        let y = Tensor::from_shape_vec(out_shape.as_slice(), y)
            .expect("written_by filled out_shape's element count");
        let (xv, wv) = (self.value_rc(), weight.value_rc());
        // Inputs: x, weight, then those of bias, image bias and residual that are given.
        let inputs: Vec<&Var> =
            [self, weight].into_iter().chain(bias).chain(image_bias).chain(residual).collect();
        let (has_b, has_t, has_r) = (bias.is_some(), image_bias.is_some(), residual.is_some());
        Var::record_many(&inputs, y, move |gy, needs| {
            let dy = contiguous(gy);
            let dx = needs[0].then(|| {
                let w = contiguous(&wv);
                // SAFETY: conv2d_backward_input_uninit writes every element of dx.
                let dx = unsafe { written_by(xv.len(), |dx| conv2d_backward_input_uninit(&g, &dy, &w, dx)) };
                Tensor::from_shape_vec(xv.shape(), dx).expect("dx holds xv.len() values")
            });
            let want_b = has_b && needs[2];
            let (dw, db) = if needs[1] || want_b {
                let mut dw = vec![0.0f32; wv.len()];
                let mut db = vec![0.0f32; g.c_out];
                conv2d_backward_weight(
                    &g,
                    &contiguous(&xv),
                    &dy,
                    &mut dw,
                    want_b.then_some(db.as_mut_slice()),
                );
                let dw = Tensor::from_shape_vec(wv.shape(), dw).expect("dw holds wv.len() values");
                (
                    needs[1].then_some(dw),
                    want_b.then(|| Tensor::from_shape_vec(vec![g.c_out], db).expect("db holds c_out values")),
                )
            } else {
                (None, None)
            };
            let mut out = vec![dx, dw];
            if has_b {
                out.push(db);
            }
            if has_t {
                // d image_bias[n, co] = Σ_p dy[n, co, p].
                let plane = g.out_h() * g.out_w();
                let dt = needs[out.len()].then(|| {
                    let sums: Vec<f32> = if plane == 0 {
                        vec![0.0; g.n * g.c_out]
                    } else {
                        dy.par_chunks(plane).map(|p| sum_f64_lanes(p, |v| v as f64) as f32).collect()
                    };
                    Tensor::from_shape_vec(vec![g.n, g.c_out], sums)
                        .expect("one sum per output plane: N·C_out values")
                });
                out.push(dt);
            }
            if has_r {
                out.push(needs[out.len()].then(|| gy.clone()));
            }
            out
        })
    }

    /// `upsample_nearest2x()` then `conv2d(weight, bias, 1, Padding::same(1))` with a 3x3 `weight`
    /// (the U-Net's upsample block). Where nothing needs a gradient (sampling), one fused kernel
    /// computes it on the small image (`kernels::upsample2x_conv3x3_forward_uninit`: 2.25 times
    /// fewer multiply-adds, equal to rounding); on a tape, the two ops.
    ///
    /// # Panics
    /// As the two ops; if `weight` is not 3x3.
    pub fn upsample2x_conv3x3(&self, weight: &Var, bias: Option<&Var>) -> Var {
        let (xs, ws) = (self.shape(), weight.shape());
        assert!(
            ws.len() == 4 && ws[2..] == [3, 3],
            "upsample2x_conv3x3: weight {ws:?} is not [C_out, C_in, 3, 3]"
        );
        let tracked = self.requires_grad() || weight.requires_grad() || bias.is_some_and(Var::requires_grad);
        if tracked || xs.len() != 4 || xs[1] != ws[1] {
            return self.upsample_nearest2x().conv2d(weight, bias, 1, Padding::same(1));
        }
        if let Some(b) = bias {
            assert_eq!(b.shape(), &[ws[0]], "upsample2x_conv3x3: bias {:?} for weight {ws:?}", b.shape());
        }
        let (n, c_in, h, w, c_out) = (xs[0], xs[1], xs[2], xs[3], ws[0]);
        let (x, wt) = (contiguous(self.value()), contiguous(weight.value()));
        let b = bias.map(|b| contiguous(b.value()));
        let len = n * c_out * 4 * h * w;
        let kept = weight.derived(PackedWeights::new);
        // SAFETY: the kernel writes every output element.
        let y = unsafe {
            written_by(len, |y| {
                upsample2x_conv3x3_forward_uninit(
                    n,
                    c_in,
                    c_out,
                    (h, w),
                    &x,
                    &wt,
                    kept.as_deref(),
                    b.as_deref(),
                    y,
                )
            })
        };
        Var::constant(Tensor::from_shape_vec(vec![n, c_out, 2 * h, 2 * w], y).expect("y has len elements"))
    }

    /// Nearest-neighbour 2x upsampling: `[N, C, H, W] -> [N, C, 2H, 2W]`, each value copied to
    /// a 2x2 block. Backward: each input gets the sum of its block's gradients.
    ///
    /// # Panics
    /// If the input is not 4-D.
    pub fn upsample_nearest2x(&self) -> Var {
        let s = self.shape().to_vec();
        assert_eq!(s.len(), 4, "upsample_nearest2x: input {s:?} is not [N, C, H, W]");
        let (nc, h, w) = (s[0] * s[1], s[2], s[3]);
        let x = contiguous(self.value());
        // SAFETY: the kernel writes every element of `y`.
        let y = unsafe { written_by(nc * 4 * h * w, |y| upsample_nearest2x_uninit(nc, h, w, &x, y)) };
        let y = Tensor::from_shape_vec(vec![s[0], s[1], 2 * h, 2 * w], y).expect("y holds nc·4·h·w values");
        Var::record([self], y, move |g, _| {
            let mut dx = zeroed(nc * h * w);
            upsample_nearest2x_backward(nc, h, w, &contiguous(g), &mut dx);
            [Some(Tensor::from_shape_vec(s.as_slice(), dx).expect("dx holds nc·h·w values"))]
        })
    }

    /// 2x2 average pooling with stride 2: `[N, C, H, W] -> [N, C, H/2, W/2]`, a trailing odd
    /// row or column dropped (PyTorch's `avg_pool2d(kernel_size=2, stride=2)`, the resampling
    /// of improved-diffusion's and diffusers' residual down-blocks). Backward: each input of a
    /// window gets a quarter of the window's gradient.
    ///
    /// # Panics
    /// If the input is not 4-D.
    pub fn avg_pool2x(&self) -> Var {
        let s = self.shape().to_vec();
        assert_eq!(s.len(), 4, "avg_pool2x: input {s:?} is not [N, C, H, W]");
        let (nc, h, w) = (s[0] * s[1], s[2], s[3]);
        let (ho, wo) = (h / 2, w / 2);
        let x = contiguous(self.value()).into_owned();
        let mut y = vec![0f32; nc * ho * wo];
        if ho * wo > 0 {
            y.par_chunks_mut(ho * wo).enumerate().for_each(|(p, out)| {
                let xp = &x[p * h * w..(p + 1) * h * w];
                for i in 0..ho {
                    for j in 0..wo {
                        let (a, b) = (2 * i * w + 2 * j, (2 * i + 1) * w + 2 * j);
                        out[i * wo + j] = 0.25 * ((xp[a] + xp[a + 1]) + (xp[b] + xp[b + 1]));
                    }
                }
            });
        }
        let y = Tensor::from_shape_vec(vec![s[0], s[1], ho, wo], y).expect("y holds nc·ho·wo values");
        Var::record([self], y, move |g, _| {
            let g = contiguous(g);
            let mut dx = vec![0f32; nc * h * w];
            if ho * wo > 0 {
                dx.par_chunks_mut(h * w).enumerate().for_each(|(p, d)| {
                    let gp = &g[p * ho * wo..(p + 1) * ho * wo];
                    for i in 0..ho {
                        for j in 0..wo {
                            let v = 0.25 * gp[i * wo + j];
                            let (a, b) = (2 * i * w + 2 * j, (2 * i + 1) * w + 2 * j);
                            d[a] = v;
                            d[a + 1] = v;
                            d[b] = v;
                            d[b + 1] = v;
                        }
                    }
                });
            }
            [Some(Tensor::from_shape_vec(s.as_slice(), dx).expect("dx holds nc·h·w values"))]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Padding;
    use crate::ops::testutil::{check, randn};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        #[test]
        fn conv2d_backward_matches_finite_differences(
            n in 1usize..3, c_in in 1usize..4, c_out in 1usize..4, h in 1usize..7, w in 1usize..7,
            k in prop::sample::select(vec![1usize, 2, 3]), stride in 1usize..3,
            pads in prop::array::uniform4(0usize..3), bias in any::<bool>(), seed in 0u64..1000
        ) {
            let pad = Padding { top: pads[0], bottom: pads[1], left: pads[2], right: pads[3] };
            prop_assume!(h + pad.top + pad.bottom >= k && w + pad.left + pad.right >= k);
            let x = randn(&[n, c_in, h, w], seed);
            let wt = randn(&[c_out, c_in, k, k], seed + 1);
            if bias {
                check(&[x, wt, randn(&[c_out], seed + 2)], seed, |v| v[0].conv2d(&v[1], Some(&v[2]), stride, pad));
            } else {
                check(&[x, wt], seed, |v| v[0].conv2d(&v[1], None, stride, pad));
            }
        }

        #[test]
        fn conv2d_plus_backward_matches_finite_differences(
            n in 1usize..3, c_in in 1usize..4, c_out in 1usize..4, hw in prop::sample::select(vec![3usize, 4, 5]),
            k in prop::sample::select(vec![1usize, 3]), parts in 0usize..8, seed in 0u64..1000
        ) {
            // Every subset of bias, image bias and residual, on a stride-1 same convolution
            // (4x4 and 5x5 images run on the implicit path where AVX-512 is present).
            let pad = Padding::same(k / 2);
            let mut inputs = vec![randn(&[n, c_in, hw, hw], seed), randn(&[c_out, c_in, k, k], seed + 1)];
            let (has_b, has_t, has_r) = (parts & 1 != 0, parts & 2 != 0, parts & 4 != 0);
            if has_b { inputs.push(randn(&[c_out], seed + 2)); }
            if has_t { inputs.push(randn(&[n, c_out], seed + 3)); }
            if has_r { inputs.push(randn(&[n, c_out, hw, hw], seed + 4)); }
            check(&inputs, seed, |v| {
                let mut rest = v[2..].iter();
                let b = if has_b { rest.next() } else { None };
                let t = if has_t { rest.next() } else { None };
                let r = if has_r { rest.next() } else { None };
                v[0].conv2d_plus(&v[1], b, t, r, 1, pad)
            });
        }

        #[test]
        fn conv2d_plus_is_the_sum_of_the_separate_ops(
            n in 1usize..4, c_in in 1usize..6, c_out in 1usize..6, hw in prop::sample::select(vec![4usize, 7, 14]),
            k in prop::sample::select(vec![1usize, 3]), seed in 0u64..1000
        ) {
            // Against conv2d + add_per_channel + add, values and all five gradients.
            use crate::{Tape, Tensor, Var};
            let pad = Padding::same(k / 2);
            let shapes = [vec![n, c_in, hw, hw], vec![c_out, c_in, k, k], vec![c_out], vec![n, c_out], vec![n, c_out, hw, hw]];
            let weights = randn(&[n, c_out, hw, hw], seed + 5);
            // The value and the gradients of Σ weights ⊙ y for x, w, b, t, r, on a tape of its own.
            let run = |fused: bool| -> (Tensor, Vec<Tensor>) {
                let tape = Tape::new();
                let v: Vec<Var> = shapes.iter().zip(0u64..).map(|(s, d)| tape.var(randn(s, seed + d))).collect();
                let y = if fused {
                    v[0].conv2d_plus(&v[1], Some(&v[2]), Some(&v[3]), Some(&v[4]), 1, pad)
                } else {
                    v[0].conv2d(&v[1], Some(&v[2]), 1, pad).add_per_channel(&v[3]).add(&v[4])
                };
                let grads = y.mul(&Var::constant(weights.clone())).sum().backward();
                (y.value().clone(), v.iter().map(|x| grads.get(x).expect("gradient").clone()).collect())
            };
            let ((yf, gf), (ya, ga)) = (run(true), run(false));
            for (name, a, e) in std::iter::once(("value", &yf, &ya)).chain(["dx", "dw", "db", "dt", "dr"].into_iter().zip(gf.iter().zip(&ga)).map(|(n, (a, e))| (n, a, e))) {
                for (p, q) in a.iter().zip(e.iter()) {
                    prop_assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{}: {} vs {}", name, p, q);
                }
            }
        }

        #[test]
        fn upsample_backward_matches_finite_differences(
            n in 1usize..3, c in 1usize..3, h in 1usize..5, w in 1usize..5, seed in 0u64..1000
        ) {
            check(&[randn(&[n, c, h, w], seed)], seed, |v| v[0].upsample_nearest2x());
        }

        #[test]
        fn avg_pool_backward_matches_finite_differences(
            n in 1usize..3, c in 1usize..3, h in 1usize..7, w in 1usize..7, seed in 0u64..1000
        ) {
            check(&[randn(&[n, c, h, w], seed)], seed, |v| v[0].avg_pool2x());
        }
    }

    #[test]
    fn avg_pool_averages_each_window_and_drops_an_odd_edge() {
        // 3x5 plane: windows (0..2)x(0..2) and (0..2)x(2..4); row 2 and column 4 are dropped.
        let x = crate::Tensor::from_shape_fn(vec![1, 1, 3, 5], |ix| (ix[2] * 5 + ix[3]) as f32);
        let y = crate::Var::constant(x).avg_pool2x();
        assert_eq!(y.shape(), &[1, 1, 1, 2]);
        assert_eq!(
            y.value().iter().copied().collect::<Vec<_>>(),
            vec![(0. + 1. + 5. + 6.) / 4., (2. + 3. + 7. + 8.) / 4.]
        );
    }

    #[test]
    fn fused_upsample_conv_equals_the_two_ops_and_keeps_the_tape() {
        use crate::{Tape, Var};
        let (x, w, b) = (randn(&[2, 5, 7, 7], 1), randn(&[3, 5, 3, 3], 2), randn(&[3], 3));
        // Without a tape: the fused kernel.
        let (xc, wc, bc) = (Var::constant(x.clone()), Var::constant(w.clone()), Var::constant(b.clone()));
        let fused = xc.upsample2x_conv3x3(&wc, Some(&bc));
        let apart = xc.upsample_nearest2x().conv2d(&wc, Some(&bc), 1, Padding::same(1));
        assert_eq!(fused.shape(), &[2, 3, 14, 14]);
        for (p, q) in fused.value().iter().zip(apart.value().iter()) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
        // On a tape: recorded, with gradients (checked against finite differences).
        let tape = Tape::new();
        assert!(tape.var(x.clone()).upsample2x_conv3x3(&wc, Some(&bc)).requires_grad());
        check(&[x, w, b], 4, |v| v[0].upsample2x_conv3x3(&v[1], Some(&v[2])));
    }

    #[test]
    fn conv2d_where_the_input_is_used_twice() {
        // y = conv(x, w) + x-as-skip: the skip path and the conv path both reach x.
        let x = randn(&[1, 2, 5, 5], 1);
        let w = randn(&[2, 2, 3, 3], 2);
        check(&[x, w], 3, |v| v[0].conv2d(&v[1], None, 1, Padding::same(1)).add(&v[0]));
    }

    #[test]
    fn stride_two_with_tf_same_padding_has_half_the_size() {
        // TensorFlow "SAME" for stride 2 on an even size pads 0 before and 1 after.
        let x = crate::Var::constant(randn(&[1, 1, 8, 8], 1));
        let w = crate::Var::constant(randn(&[1, 1, 3, 3], 2));
        let pad = Padding { top: 0, bottom: 1, left: 0, right: 1 };
        assert_eq!(x.conv2d(&w, None, 2, pad).shape(), &[1, 1, 4, 4]);
    }
}
