//! Matrix products: 2-D matmul, batched matmul over a leading axis, and the linear layer.

use ndarray::{Array2, ArrayView2, Axis, Ix2};

use super::par::zeroed;
use crate::{kernels, Tensor, Var};

fn as2<'a>(x: &'a Tensor, op: &str) -> ArrayView2<'a, f32> {
    x.view()
        .into_dimensionality::<Ix2>()
        .unwrap_or_else(|_| panic!("{op}: expected a matrix, got {:?}", x.shape()))
}

/// `a @ b` for matrices on [`kernels::sgemm`] (a transposed view is passed as such, anything
/// else laid out row-major first), or the GPU when [`crate::device::offload`] says so.
fn mm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    #[cfg(feature = "wgpu")]
    if let Some(c) = crate::gpu::bmm(a.insert_axis(Axis(0)), b.insert_axis(Axis(0))) {
        return c.index_axis_move(Axis(0), 0);
    }
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    let (a_data, trans_a) = stored(a);
    let (b_data, trans_b) = stored(b);
    let mut c = vec![0.0f32; m * n];
    kernels::sgemm(trans_a, trans_b, m, k, n, 1.0, &a_data, &b_data, 0.0, &mut c);
    // Cannot fail: `c` was made `m·n` long above and sgemm keeps its length.
    Array2::from_shape_vec((m, n), c).expect("c holds m·n values")
}

/// A matrix's elements in row-major order, or its transpose's (then `true`): borrowed where the
/// view already is one of the two.
fn stored(x: ArrayView2<'_, f32>) -> (std::borrow::Cow<'_, [f32]>, bool) {
    if let Some(s) = x.to_slice() {
        (std::borrow::Cow::Borrowed(s), false)
    } else if let Some(s) = x.reversed_axes().to_slice() {
        (std::borrow::Cow::Borrowed(s), true)
    } else {
        (std::borrow::Cow::Owned(x.iter().copied().collect()), false)
    }
}

/// `a[i] @ b[i]` for every `i` of the leading axis.
impl Var {
    /// Matrix product `[M, K] @ [K, N] -> [M, N]`.
    /// Backward: `dA = dC Bᵀ`, `dB = Aᵀ dC`.
    ///
    /// # Panics
    /// If either input is not 2-D or the inner sizes differ.
    pub fn matmul(&self, other: &Var) -> Var {
        let (a, b) = (as2(self.value(), "matmul"), as2(other.value(), "matmul"));
        assert_eq!(a.ncols(), b.nrows(), "matmul: {:?} @ {:?}", self.shape(), other.shape());
        let y = mm(a, b).into_dyn();
        let (a, b) = (self.value_rc(), other.value_rc());
        Var::record([self, other], y, move |g, needs| {
            let g = as2(g, "matmul backward");
            let da = needs[0].then(|| mm(g, as2(&b, "").t()).into_dyn());
            let db = needs[1].then(|| mm(as2(&a, "").t(), g).into_dyn());
            [da, db]
        })
    }

    /// Batched matrix product `[B, M, K] @ [B, K, N] -> [B, M, N]`.
    ///
    /// # Panics
    /// If either input is not 3-D or the batch or inner sizes differ.
    pub fn bmm(&self, other: &Var) -> Var {
        self.bmm_t(other, false, false, 1.0)
    }

    /// `α · op(A) @ op(B)` per batch item, where `op(X)` is `X` or, when its flag is set, `Xᵀ`
    /// (the last two axes swapped) without materialising the transpose: `A: [B, M, K]` or
    /// `[B, K, M]`, `B: [B, K, N]` or `[B, N, K]`, result `[B, M, N]`. Runs on
    /// [`crate::kernels::sgemm_batched`], one batch item per task.
    ///
    /// Backward (with `G = ∂L/∂C`): `∂L/∂op(A) = α G op(B)ᵀ`, `∂L/∂op(B) = α op(A)ᵀ G`, each
    /// written in the stored orientation of its input by choosing the operand order and flags.
    ///
    /// # Panics
    /// If either input is not 3-D or the batch or inner sizes differ.
    pub fn bmm_t(&self, other: &Var, trans_a: bool, trans_b: bool, alpha: f32) -> Var {
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        assert!(
            sa.len() == 3 && sb.len() == 3,
            "bmm: expected [B, M, K] and [B, K, N], got {sa:?} and {sb:?}"
        );
        let (m, k) = if trans_a { (sa[2], sa[1]) } else { (sa[1], sa[2]) };
        let (k2, n) = if trans_b { (sb[2], sb[1]) } else { (sb[1], sb[2]) };
        assert!(
            sa[0] == sb[0] && k == k2,
            "bmm: {sa:?}{} @ {sb:?}{}: batch or inner sizes differ",
            if trans_a { "ᵀ" } else { "" },
            if trans_b { "ᵀ" } else { "" }
        );
        let batch = sa[0];
        // Values on the tape are kept in standard layout, so these are the tensors themselves.
        let (av, bv) = (self.value_rc(), other.value_rc());
        let mut c = zeroed(batch * m * n);
        {
            let (a_data, b_data) = (av.as_standard_layout(), bv.as_standard_layout());
            let (a_data, b_data) = (
                a_data.as_slice().expect("as_standard_layout above"),
                b_data.as_slice().expect("as_standard_layout above"),
            );
            kernels::sgemm_batched(batch, trans_a, trans_b, m, k, n, alpha, a_data, b_data, 0.0, &mut c);
        }
        let y = Tensor::from_shape_vec(vec![batch, m, n], c).expect("c holds batch·m·n values");
        Var::record([self, other], y, move |g, needs| {
            let g = g.as_slice().expect("the tape keeps gradients in standard layout");
            let (a_data, b_data) = (av.as_standard_layout(), bv.as_standard_layout());
            let (a_data, b_data) = (
                a_data.as_slice().expect("as_standard_layout above"),
                b_data.as_slice().expect("as_standard_layout above"),
            );
            let out = |rows: usize, inner: usize, cols: usize, x: (&[f32], bool), y: (&[f32], bool)| {
                let mut d = zeroed(batch * rows * cols);
                kernels::sgemm_batched(batch, x.1, y.1, rows, inner, cols, alpha, x.0, y.0, 0.0, &mut d);
                d
            };
            // dA in A's stored orientation: [M, K] = G op(B)ᵀ, or [K, M] = op(B) Gᵀ.
            let da = needs[0].then(|| {
                let d = if trans_a {
                    out(k, n, m, (b_data, trans_b), (g, true))
                } else {
                    out(m, n, k, (g, false), (b_data, !trans_b))
                };
                Tensor::from_shape_vec(sa.as_slice(), d).expect("d holds batch·m·k values: A's size")
            });
            // dB in B's stored orientation: [K, N] = op(A)ᵀ G, or [N, K] = Gᵀ op(A).
            let db = needs[1].then(|| {
                let d = if trans_b {
                    out(n, m, k, (g, true), (a_data, trans_a))
                } else {
                    out(k, m, n, (a_data, !trans_a), (g, false))
                };
                Tensor::from_shape_vec(sb.as_slice(), d).expect("d holds batch·k·n values: B's size")
            });
            [da, db]
        })
    }

    /// Linear layer `y = x Wᵀ + b` with PyTorch's weight layout: x `[N, in]`, W `[out, in]`,
    /// b `[out]`, y `[N, out]`.
    ///
    /// # Panics
    /// On mismatched sizes.
    pub fn linear(&self, weight: &Var, bias: Option<&Var>) -> Var {
        let (x, w) = (as2(self.value(), "linear"), as2(weight.value(), "linear"));
        assert_eq!(x.ncols(), w.ncols(), "linear: x {:?} with weight {:?}", self.shape(), weight.shape());
        let mut y = mm(x, w.t());
        if let Some(b) = bias {
            assert_eq!(
                b.shape(),
                &[w.nrows()],
                "linear: bias {:?} for weight {:?}",
                b.shape(),
                weight.shape()
            );
            y += &b.value().view().into_dimensionality::<ndarray::Ix1>().expect("asserted [out] above");
        }
        let (xs, ws) = (self.value_rc(), weight.value_rc());
        let inputs: Vec<&Var> = std::iter::once(self).chain(std::iter::once(weight)).chain(bias).collect();
        Var::record_many(&inputs, y.into_dyn(), move |g, needs| {
            let g = as2(g, "linear backward");
            let dx = needs[0].then(|| mm(g, as2(&ws, "")).into_dyn());
            let dw = needs[1].then(|| mm(g.t(), as2(&xs, "")).into_dyn());
            let mut out = vec![dx, dw];
            if needs.len() == 3 {
                out.push(needs[2].then(|| g.sum_axis(Axis(0)).into_dyn()));
            }
            out
        })
    }

    /// Softmax attention: `o[n] = v[n] · softmax(scale · q[n]ᵀ k[n])ᵀ` with `q`, `k`, `v` each
    /// `[N, C, HW]` and the softmax over the keys; the value of
    /// `v.bmm_t(&q.bmm_t(k, true, false, scale).softmax(), false, true, 1.0)`, computed per image
    /// without the `[N, HW, HW]` weights ([`kernels::attention_forward`]). Backward recomputes
    /// the weights per image ([`kernels::attention_backward`]).
    ///
    /// # Panics
    /// If the inputs are not all `[N, C, HW]` of one shape.
    pub fn attention(q: &Var, k: &Var, v: &Var, scale: f32) -> Var {
        let s = q.shape().to_vec();
        assert!(
            s.len() == 3 && k.shape() == s.as_slice() && v.shape() == s.as_slice(),
            "attention: q, k, v must be one [N, C, HW] shape, got {s:?}, {:?}, {:?}",
            k.shape(),
            v.shape()
        );
        let (n, c, hw) = (s[0], s[1], s[2]);
        let standard = |x: &Var| {
            if x.value().is_standard_layout() {
                x.value_rc()
            } else {
                std::rc::Rc::new(x.value().as_standard_layout().into_owned())
            }
        };
        let (qv, kv, vv) = (standard(q), standard(k), standard(v));
        let mut o = zeroed(qv.len());
        kernels::attention_forward(
            n,
            c,
            hw,
            contiguous(&qv),
            contiguous(&kv),
            contiguous(&vv),
            scale,
            &mut o,
        );
        let y = Tensor::from_shape_vec(s.as_slice(), o).expect("o holds one value per element of q");
        Var::record([q, k, v], y, move |g, _| {
            let g = g.as_standard_layout();
            let (mut dq, mut dk, mut dv) = (zeroed(qv.len()), zeroed(qv.len()), zeroed(qv.len()));
            let g = g.as_slice().expect("as_standard_layout above");
            kernels::attention_backward(
                n,
                c,
                hw,
                contiguous(&qv),
                contiguous(&kv),
                contiguous(&vv),
                scale,
                g,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            let t = |d: Vec<f32>| Some(Tensor::from_shape_vec(s.as_slice(), d).expect("d has q's size"));
            [t(dq), t(dk), t(dv)]
        })
    }
}

/// The elements of a standard-layout value.
fn contiguous(t: &Tensor) -> &[f32] {
    t.as_slice().expect("attention passes only values made standard by its `standard` closure")
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn};
    use crate::Var;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn matmul_family_backward_matches_finite_differences(
            b in 1usize..3, m in 1usize..5, k in 1usize..5, n in 1usize..5, seed in 0u64..1000
        ) {
            check(&[randn(&[m, k], seed), randn(&[k, n], seed + 1)], seed, |v| v[0].matmul(&v[1]));
            check(&[randn(&[b, m, k], seed), randn(&[b, k, n], seed + 1)], seed, |v| v[0].bmm(&v[1]));
            for (ta, tb) in [(true, false), (false, true), (true, true)] {
                let sa = if ta { [b, k, m] } else { [b, m, k] };
                let sb = if tb { [b, n, k] } else { [b, k, n] };
                check(&[randn(&sa, seed), randn(&sb, seed + 1)], seed, |v| v[0].bmm_t(&v[1], ta, tb, 0.7));
            }
            check(&[randn(&[m, k], seed), randn(&[n, k], seed + 1), randn(&[n], seed + 2)], seed,
                |v| v[0].linear(&v[1], Some(&v[2])));
            check(&[randn(&[m, k], seed), randn(&[n, k], seed + 1)], seed, |v| v[0].linear(&v[1], None));
            // x used on both sides of a product: x @ xᵀ.
            check(&[randn(&[m, k], seed)], seed, |v| v[0].matmul(&v[0].transpose(0, 1)));
        }
    }

    #[test]
    fn matmul_of_known_matrices() {
        let a = Var::constant(ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn());
        let b = Var::constant(ndarray::arr2(&[[5.0f32, 6.0], [7.0, 8.0]]).into_dyn());
        assert_eq!(a.matmul(&b).value().as_slice().unwrap(), &[19.0, 22.0, 43.0, 50.0]);
    }
}
