//! Matrix products: 2-D matmul, batched matmul over a leading axis, and the linear layer.

use ndarray::{linalg::general_mat_mul, Array2, Array3, ArrayView2, ArrayView3, Axis, Ix2, Ix3};

use crate::{Tensor, Var};

fn as2<'a>(x: &'a Tensor, op: &str) -> ArrayView2<'a, f32> {
    x.view()
        .into_dimensionality::<Ix2>()
        .unwrap_or_else(|_| panic!("{op}: expected a matrix, got {:?}", x.shape()))
}

fn as3<'a>(x: &'a Tensor, op: &str) -> ArrayView3<'a, f32> {
    x.view()
        .into_dimensionality::<Ix3>()
        .unwrap_or_else(|_| panic!("{op}: expected [B, M, K], got {:?}", x.shape()))
}

/// `a @ b` for matrices (ndarray's gemm, which runs matrixmultiply's kernels, or the GPU when
/// [`crate::device::offload`] says so).
fn mm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    #[cfg(feature = "wgpu")]
    if let Some(c) = crate::gpu::bmm(a.insert_axis(Axis(0)), b.insert_axis(Axis(0))) {
        return c.index_axis_move(Axis(0), 0);
    }
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    c
}

/// `a[i] @ b[i]` for every `i` of the leading axis (on the GPU when [`crate::device::offload`]
/// says so).
fn bmm(a: ArrayView3<'_, f32>, b: ArrayView3<'_, f32>) -> Array3<f32> {
    #[cfg(feature = "wgpu")]
    if let Some(c) = crate::gpu::bmm(a.view(), b.view()) {
        return c;
    }
    let (batch, m, _) = a.dim();
    let n = b.dim().2;
    let mut c = Array3::zeros((batch, m, n));
    for ((ai, bi), mut ci) in a.outer_iter().zip(b.outer_iter()).zip(c.outer_iter_mut()) {
        general_mat_mul(1.0, &ai, &bi, 0.0, &mut ci);
    }
    c
}

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
        let (a, b) = (as3(self.value(), "bmm"), as3(other.value(), "bmm"));
        assert!(
            a.dim().0 == b.dim().0 && a.dim().2 == b.dim().1,
            "bmm: {:?} @ {:?}",
            self.shape(),
            other.shape()
        );
        let y = bmm(a, b).into_dyn();
        let (a, b) = (self.value_rc(), other.value_rc());
        Var::record([self, other], y, move |g, needs| {
            let g = as3(g, "bmm backward");
            let bt = as3(&b, "").permuted_axes([0, 2, 1]);
            let at = as3(&a, "").permuted_axes([0, 2, 1]);
            let da = needs[0].then(|| bmm(g, bt).into_dyn());
            let db = needs[1].then(|| bmm(at, g).into_dyn());
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
            y += &b.value().view().into_dimensionality::<ndarray::Ix1>().expect("checked 1-D");
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
