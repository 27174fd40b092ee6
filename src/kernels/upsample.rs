//! Nearest-neighbour 2x upsampling (the U-Net decoder's resize before its 3x3 conv) and its
//! gradient. Parallel over the `N·C` planes; each output element is written by one task.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::as_uninit;

/// Nearest-neighbour 2x upsampling: `y[n, c, 2i + a, 2j + b] = x[n, c, i, j]` for `a, b ∈ {0, 1}`.
///
/// Shapes: `x: [N, C, H, W]` seen as `n_c = N·C` planes of `[H, W]`, `y: [N, C, 2H, 2W]`
/// (overwritten).
///
/// # Panics
/// If `x` does not have `n_c·h·w` elements or `y` does not have `4·n_c·h·w`.
pub fn upsample_nearest2x(n_c: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
    upsample_nearest2x_uninit(n_c, h, w, x, as_uninit(y));
}

/// [`upsample_nearest2x`] into memory that need not be initialised: every element of `y` is
/// written.
///
/// # Panics
/// As [`upsample_nearest2x`].
pub fn upsample_nearest2x_uninit(n_c: usize, h: usize, w: usize, x: &[f32], y: &mut [MaybeUninit<f32>]) {
    let plane = h * w;
    assert_eq!(
        x.len(),
        n_c * plane,
        "upsample_nearest2x: x has {} elements, expected n_c*h*w = {n_c}*{h}*{w}",
        x.len()
    );
    assert_eq!(
        y.len(),
        4 * n_c * plane,
        "upsample_nearest2x: y has {} elements, expected n_c*2h*2w = {n_c}*{}*{}",
        y.len(),
        2 * h,
        2 * w
    );
    if plane == 0 {
        return;
    }
    y.par_chunks_mut(4 * plane).zip(x.par_chunks(plane)).for_each(|(y_plane, x_plane)| {
        for (x_row, y_rows) in x_plane.chunks(w).zip(y_plane.chunks_mut(4 * w)) {
            let (top, bottom) = y_rows.split_at_mut(2 * w);
            for ((top, bottom), &v) in top.chunks_mut(2).zip(bottom.chunks_mut(2)).zip(x_row) {
                for out in top.iter_mut().chain(bottom) {
                    out.write(v);
                }
            }
        }
    });
}

/// Gradient of [`upsample_nearest2x`]: `dx[n, c, i, j] = Σ_{a,b ∈ {0,1}} dy[n, c, 2i + a, 2j + b]`,
/// the sum of the four outputs the input element was copied to.
///
/// Shapes: `dy: [N, C, 2H, 2W]`, `dx: [N, C, H, W]` (overwritten), with `n_c = N·C`.
///
/// # Panics
/// If `dy` does not have `4·n_c·h·w` elements or `dx` does not have `n_c·h·w`.
pub fn upsample_nearest2x_backward(n_c: usize, h: usize, w: usize, dy: &[f32], dx: &mut [f32]) {
    let plane = h * w;
    assert_eq!(
        dy.len(),
        4 * n_c * plane,
        "upsample_nearest2x_backward: dy has {} elements, expected n_c*2h*2w = {n_c}*{}*{}",
        dy.len(),
        2 * h,
        2 * w
    );
    assert_eq!(
        dx.len(),
        n_c * plane,
        "upsample_nearest2x_backward: dx has {} elements, expected n_c*h*w = {n_c}*{h}*{w}",
        dx.len()
    );
    if plane == 0 {
        return;
    }
    dx.par_chunks_mut(plane).zip(dy.par_chunks(4 * plane)).for_each(|(dx_plane, dy_plane)| {
        for (dx_row, dy_rows) in dx_plane.chunks_mut(w).zip(dy_plane.chunks(4 * w)) {
            let (top, bottom) = dy_rows.split_at(2 * w);
            for (j, d) in dx_row.iter_mut().enumerate() {
                *d = (top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    #[test]
    fn upsample_copies_each_pixel_into_a_2x2_block() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [1, 1, 2, 3]
        let mut y = [0.0; 24];
        upsample_nearest2x(1, 2, 3, &x, &mut y);
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
        ];
        assert_eq!(y, want);
    }

    proptest! {
        /// ⟨up(x), dy⟩ = ⟨x, up_backward(dy)⟩, checked in f64.
        #[test]
        fn backward_is_the_adjoint_of_upsampling(seed in any::<u64>(), n_c in 0usize..=4, h in 1usize..=6, w in 1usize..=6) {
            let mut rng = crate::rng_from_seed(seed);
            let x: Vec<f32> = (0..n_c * h * w).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let dy: Vec<f32> = (0..4 * n_c * h * w).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![f32::NAN; dy.len()];
            upsample_nearest2x(n_c, h, w, &x, &mut y);
            let mut dx = vec![f32::NAN; x.len()];
            upsample_nearest2x_backward(n_c, h, w, &dy, &mut dx);
            let lhs: f64 = y.iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = y.iter().zip(&dy).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            prop_assert!((lhs - rhs).abs() <= 1e-6 * scale + 1e-12, "<up(x), dy> = {lhs}, <x, dx> = {rhs}");
        }
    }

    #[test]
    #[should_panic(expected = "upsample_nearest2x: y has 15 elements")]
    fn upsample_panics_naming_the_mismatched_output() {
        let mut y = [0.0; 15];
        upsample_nearest2x(1, 2, 2, &[0.0; 4], &mut y);
    }
}
