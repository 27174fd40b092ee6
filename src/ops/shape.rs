//! Ops that move values without changing them: reshape, permute, transpose, concat, slice.

use ndarray::{Axis, IxDyn, Slice};

use super::par::{copied, filled_uninit, write_from};
use crate::{Tensor, Var};

/// A row-major copy in the given logical order.
fn standard(x: ndarray::ArrayViewD<'_, f32>) -> Tensor {
    match x.as_slice() {
        Some(s) => Tensor::from_shape_vec(x.raw_dim(), copied(s))
            .expect("copied(s) holds one value per element of x"),
        None => x.as_standard_layout().into_owned(),
    }
}

/// `x` itself when it is already row-major, else a row-major copy.
fn standard_owned(x: Tensor) -> Tensor {
    if x.is_standard_layout() {
        x
    } else {
        x.as_standard_layout().into_owned()
    }
}

impl Var {
    /// Same elements in row-major order, new shape.
    ///
    /// # Panics
    /// If the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Var {
        let y = standard(self.value().view())
            .into_shape_with_order(IxDyn(shape))
            .unwrap_or_else(|_| panic!("reshape: {:?} has a different size from {:?}", self.shape(), shape));
        let in_shape = self.shape().to_vec();
        Var::record_owned([self], y, move |g, _| {
            // Gradients are kept in standard layout, so this reuses g's buffer. Cannot fail: the
            // result is row-major and in_shape has y's element count (the forward reshape checked).
            let g = standard_owned(g).into_shape_with_order(IxDyn(&in_shape)).expect("same element count");
            [Some(g)]
        })
    }

    /// Reorders the axes: output axis `i` is input axis `axes[i]`.
    ///
    /// # Panics
    /// If `axes` is not a permutation of `0..ndim`.
    pub fn permute(&self, axes: &[usize]) -> Var {
        let n = self.value().ndim();
        let mut seen = vec![false; n];
        assert_eq!(axes.len(), n, "permute: {axes:?} for shape {:?}", self.shape());
        for &a in axes {
            assert!(a < n && !seen[a], "permute: {axes:?} is not a permutation of 0..{n}");
            seen[a] = true;
        }
        let y = standard(self.value().view().permuted_axes(IxDyn(axes)));
        let mut inverse = vec![0; n];
        for (i, &a) in axes.iter().enumerate() {
            inverse[a] = i;
        }
        Var::record([self], y, move |g, _| [Some(standard(g.view().permuted_axes(IxDyn(&inverse))))])
    }

    /// Swaps two axes.
    ///
    /// # Panics
    /// If an axis is out of range.
    pub fn transpose(&self, a: usize, b: usize) -> Var {
        let mut axes: Vec<usize> = (0..self.value().ndim()).collect();
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// Joins values along `axis`; all other axes must agree.
    ///
    /// # Panics
    /// If `vars` is empty or the shapes disagree off `axis`.
    pub fn concat(vars: &[&Var], axis: usize) -> Var {
        assert!(!vars.is_empty(), "concat: nothing to join");
        let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.shape().to_vec()).collect();
        let mut out_shape = shapes[0].clone();
        assert!(axis < out_shape.len(), "concat: axis {axis} of {out_shape:?}");
        let agree = shapes.iter().all(|s| {
            s.len() == out_shape.len()
                && s.iter().zip(&out_shape).enumerate().all(|(i, (a, b))| i == axis || a == b)
        });
        assert!(agree, "concat: shapes {shapes:?} do not agree off axis {axis}");
        out_shape[axis] = shapes.iter().map(|s| s[axis]).sum();
        // Row-major: the result is `outer` blocks, each the inputs' blocks of `s[axis]·inner`
        // elements one after another.
        let outer: usize = out_shape[..axis].iter().product();
        let inner: usize = out_shape[axis + 1..].iter().product();
        let blocks: Vec<usize> = shapes.iter().map(|s| s[axis] * inner).collect();
        let values: Vec<_> = vars.iter().map(|v| v.value().as_standard_layout()).collect();
        let slices: Vec<&[f32]> =
            values.iter().map(|v| v.as_slice().expect("as_standard_layout above")).collect();
        let total: usize = blocks.iter().sum();
        // SAFETY: the blocks, one after another, cover each chunk of `total` elements.
        let y = unsafe {
            filled_uninit(outer * total, total, |o, out| {
                let mut at = 0;
                for (x, &len) in slices.iter().zip(&blocks) {
                    write_from(&mut out[at..at + len], &x[o * len..(o + 1) * len]);
                    at += len;
                }
            })
        };
        let y = Tensor::from_shape_vec(out_shape.as_slice(), y)
            .expect("y holds outer·total values: out_shape's size");
        Var::record_many(vars, y, move |g, needs| {
            let g = g.as_standard_layout();
            let g = g.as_slice().expect("as_standard_layout above");
            let mut offset = 0;
            shapes
                .iter()
                .zip(&blocks)
                .zip(needs)
                .map(|((shape, &len), &need)| {
                    let piece = need.then(|| {
                        // SAFETY: write_from covers each whole chunk.
                        let d = unsafe {
                            filled_uninit(outer * len, len, |o, out| {
                                let start = o * total + offset;
                                write_from(out, &g[start..start + len]);
                            })
                        };
                        Tensor::from_shape_vec(shape.as_slice(), d)
                            .expect("d holds outer·len values: this input's size")
                    });
                    offset += len;
                    piece
                })
                .collect()
        })
    }

    /// The elements with index in `start..end` along `axis` (a narrowing, like `x[:, a:b]`).
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Var {
        let len = self.shape()[axis];
        assert!(start <= end && end <= len, "slice: {start}..{end} of axis {axis} with size {len}");
        let y = self.value().slice_axis(Axis(axis), Slice::from(start..end)).to_owned();
        let in_shape = self.shape().to_vec();
        Var::record([self], y, move |g, _| {
            let mut dx = Tensor::zeros(IxDyn(&in_shape));
            dx.slice_axis_mut(Axis(axis), Slice::from(start..end)).assign(g);
            [Some(dx)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn, shape_strategy};
    use crate::Var;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn shape_ops_backward_match_finite_differences(shape in shape_strategy(3, 4), seed in 0u64..1000) {
            let x = randn(&shape, seed);
            let n: usize = shape.iter().product();
            check(&[x.clone()], seed, |v| v[0].reshape(&[n]));
            check(&[x.clone()], seed, |v| v[0].reshape(&[shape[2], 1, shape[0] * shape[1]]));
            check(&[x.clone()], seed, |v| v[0].permute(&[2, 0, 1]));
            check(&[x.clone()], seed, |v| v[0].transpose(0, 2));
            check(&[x.clone()], seed, |v| v[0].slice(1, 0, shape[1]));
            check(&[x.clone()], seed, |v| v[0].slice(2, shape[2] / 2, shape[2]));
            // Concat of two different values and of one value with itself (used twice).
            let y = randn(&[shape[0], 2, shape[2]], seed + 1);
            check(&[x.clone(), y], seed, |v| Var::concat(&[&v[0], &v[1]], 1));
            check(&[x.clone()], seed, |v| Var::concat(&[&v[0], &v[0].mul_scalar(2.0)], 0));
        }
    }

    #[test]
    fn permute_moves_elements_where_expected() {
        let x = Var::constant(
            ndarray::Array::from_shape_fn((2, 3, 4), |(a, b, c)| (a * 100 + b * 10 + c) as f32).into_dyn(),
        );
        let y = x.permute(&[2, 0, 1]);
        assert_eq!(y.shape(), &[4, 2, 3]);
        assert_eq!(y.value()[[3, 1, 2]], 123.0);
    }
}
