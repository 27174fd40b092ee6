use super::backward::{backward_input_tiled, backward_weight_tiled};
use super::*;
use proptest::prelude::*;
use rand::Rng as _;

fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Calls `f(n, co, oh, ow, ci, i, j, x_index)` for every multiply-add of the convolution
/// whose input element is inside the image (padding contributes nothing).
fn for_each_tap(g: &Conv2dGeom, mut f: impl FnMut(usize, usize, usize, usize, usize, usize, usize, usize)) {
    let (out_h, out_w) = (g.out_h(), g.out_w());
    for n in 0..g.n {
        for co in 0..g.c_out {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    for ci in 0..g.c_in {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih = (oh * g.stride + i) as isize - g.pad_top as isize;
                                let iw = (ow * g.stride + j) as isize - g.pad_left as isize;
                                if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.c_in + ci) * g.h + ih as usize) * g.w + iw as usize;
                                f(n, co, oh, ow, ci, i, j, xi);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Reference values in f64 and, per element, the sum of the absolute values of its terms.
struct Reference {
    value: Vec<f64>,
    scale: Vec<f64>,
}

impl Reference {
    fn zeros(len: usize) -> Self {
        Self { value: vec![0.0; len], scale: vec![0.0; len] }
    }
    fn add(&mut self, idx: usize, term: f64) {
        self.value[idx] += term;
        self.scale[idx] += term.abs();
    }
}

fn y_index(g: &Conv2dGeom, n: usize, co: usize, oh: usize, ow: usize) -> usize {
    ((n * g.c_out + co) * g.out_h() + oh) * g.out_w() + ow
}

fn w_index(g: &Conv2dGeom, co: usize, ci: usize, i: usize, j: usize) -> usize {
    ((co * g.c_in + ci) * g.kh + i) * g.kw + j
}

fn forward_ref(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Reference {
    let mut r = Reference::zeros(g.y_len());
    if let Some(b) = bias {
        for n in 0..g.n {
            for (co, &b_co) in b.iter().enumerate() {
                for oh in 0..g.out_h() {
                    for ow in 0..g.out_w() {
                        r.add(y_index(g, n, co, oh, ow), b_co as f64);
                    }
                }
            }
        }
    }
    for_each_tap(g, |n, co, oh, ow, ci, i, j, xi| {
        r.add(y_index(g, n, co, oh, ow), w[w_index(g, co, ci, i, j)] as f64 * x[xi] as f64);
    });
    r
}

fn backward_input_ref(g: &Conv2dGeom, dy: &[f32], w: &[f32]) -> Reference {
    let mut r = Reference::zeros(g.x_len());
    for_each_tap(g, |n, co, oh, ow, ci, i, j, xi| {
        r.add(xi, w[w_index(g, co, ci, i, j)] as f64 * dy[y_index(g, n, co, oh, ow)] as f64);
    });
    r
}

fn backward_weight_ref(g: &Conv2dGeom, x: &[f32], dy: &[f32]) -> (Reference, Reference) {
    let mut dw = Reference::zeros(g.w_len());
    let mut db = Reference::zeros(g.c_out);
    for_each_tap(g, |n, co, oh, ow, ci, i, j, xi| {
        dw.add(w_index(g, co, ci, i, j), x[xi] as f64 * dy[y_index(g, n, co, oh, ow)] as f64);
    });
    for n in 0..g.n {
        for co in 0..g.c_out {
            for oh in 0..g.out_h() {
                for ow in 0..g.out_w() {
                    db.add(co, dy[y_index(g, n, co, oh, ow)] as f64);
                }
            }
        }
    }
    (dw, db)
}

fn assert_close(got: &[f32], want: &Reference, what: &str) {
    assert_eq!(got.len(), want.value.len(), "{what}: length");
    for (idx, &g) in got.iter().enumerate() {
        let (w, s) = (want.value[idx], want.scale[idx]);
        let err = (g as f64 - w).abs();
        assert!(err <= 1e-5 * s + 1e-12, "{what}[{idx}]: got {g}, want {w} (scale {s}, err {err})");
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
}

fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum()
}

/// Builds a geometry, growing `h`/`w` if the kernel would not fit the padded input.
#[allow(clippy::too_many_arguments)]
fn geom(
    n: usize,
    c_in: usize,
    c_out: usize,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    (pad_top, pad_bottom, pad_left, pad_right): (usize, usize, usize, usize),
) -> Conv2dGeom {
    let h = h.max(kh.saturating_sub(pad_top + pad_bottom));
    let w = w.max(kw.saturating_sub(pad_left + pad_right));
    Conv2dGeom { n, c_in, h, w, c_out, kh, kw, stride, pad_top, pad_bottom, pad_left, pad_right }
}

fn kernel_size() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 5])
}

/// Random geometries: any kernel in {1, 2, 3, 5}², stride 1 or 2, each pad 0..=2; plus the
/// pointwise fast path and TensorFlow "SAME" stride-2 padding, which random draws rarely hit.
fn geometry() -> impl Strategy<Value = Conv2dGeom> {
    let general = (
        1usize..=3,
        1usize..=5,
        1usize..=5,
        (1usize..=9, 1usize..=9),
        (kernel_size(), kernel_size()),
        1usize..=2,
        (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
    )
        .prop_map(|(n, ci, co, hw, k, s, p)| geom(n, ci, co, hw, k, s, p));
    let pointwise = (1usize..=3, 1usize..=5, 1usize..=5, (1usize..=9, 1usize..=9))
        .prop_map(|(n, ci, co, hw)| geom(n, ci, co, hw, (1, 1), 1, (0, 0, 0, 0)));
    let same_stride2 = (1usize..=3, 1usize..=5, 1usize..=5, (1usize..=4, 1usize..=4))
        .prop_map(|(n, ci, co, (h, w))| geom(n, ci, co, (2 * h, 2 * w), (3, 3), 2, (0, 1, 0, 1)));
    prop_oneof![6 => general, 1 => pointwise, 1 => same_stride2, 2 => same()]
}

/// Stride-1 geometries whose output is as large as the input (the implicit path): any
/// kernel in {1, 2, 3, 5}², any split of its `k − 1` padding; images up to 40 wide so strips
/// of 32 pixels cross rows; up to 20 channels so the inner dimension crosses a k-block.
fn same() -> impl Strategy<Value = Conv2dGeom> {
    (kernel_size(), kernel_size())
        .prop_flat_map(|(kh, kw)| {
            (
                (1usize..=3, 1usize..=20, 1usize..=20),
                (1usize..=40, 1usize..=40),
                (Just((kh, kw)), 0..kh, 0..kw),
            )
        })
        .prop_map(|((n, ci, co), hw, ((kh, kw), top, left))| {
            geom(n, ci, co, hw, (kh, kw), 1, (top, kh - 1 - top, left, kw - 1 - left))
        })
}

/// A geometry, a tile width (from 1 pixel to the whole image), and a data seed.
fn case() -> impl Strategy<Value = (Conv2dGeom, usize, u64)> {
    geometry().prop_flat_map(|g| {
        let px = g.out_h() * g.out_w();
        (Just(g), prop_oneof![Just(g.tile_px()), 1..=px], any::<u64>())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn forward_matches_f64_reference((g, tile, seed) in case(), with_bias in any::<bool>()) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let bias = with_bias.then_some(&b[..]);
        let mut y = vec![f32::NAN; g.y_len()];
        forward_tiled(&g, &x, &w, bias, &mut y, tile);
        assert_close(&y, &forward_ref(&g, &x, &w, bias), &format!("forward {g:?} tile {tile}"));
    }

    #[test]
    fn forward_plus_matches_f64_reference((g, _tile, seed) in case(), parts in 0usize..8) {
        check_forward_plus(&g, seed, parts);
    }

    #[test]
    fn backward_input_entry_point_matches_f64_reference((g, _tile, seed) in case()) {
        // The public function, which takes the forward-convolution route for stride 1.
        let mut rng = crate::rng_from_seed(seed);
        let dy = random_vec(&mut rng, g.y_len());
        let w = random_vec(&mut rng, g.w_len());
        let mut dx = vec![f32::NAN; g.x_len()];
        conv2d_backward_input(&g, &dy, &w, &mut dx);
        assert_close(&dx, &backward_input_ref(&g, &dy, &w), &format!("conv2d_backward_input {g:?}"));
    }

    #[test]
    fn backward_input_matches_f64_reference((g, tile, seed) in case()) {
        let mut rng = crate::rng_from_seed(seed);
        let dy = random_vec(&mut rng, g.y_len());
        let w = random_vec(&mut rng, g.w_len());
        let mut dx = vec![f32::NAN; g.x_len()];
        backward_input_tiled(&g, &dy, &w, &mut dx, tile);
        assert_close(&dx, &backward_input_ref(&g, &dy, &w), &format!("backward_input {g:?} tile {tile}"));
    }

    #[test]
    fn backward_weight_matches_f64_reference(
        (g, tile, seed) in case(),
        max_partials in prop_oneof![Just(MAX_WEIGHT_PARTIALS), 1usize..=3],
    ) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let dy = random_vec(&mut rng, g.y_len());
        let mut dw = vec![f32::NAN; g.w_len()];
        let mut db = vec![f32::NAN; g.c_out];
        backward_weight_tiled(&g, &x, &dy, &mut dw, Some(&mut db), tile, max_partials);
        let (dw_ref, db_ref) = backward_weight_ref(&g, &x, &dy);
        assert_close(&dw, &dw_ref, &format!("backward_weight dw {g:?} tile {tile}"));
        assert_close(&db, &db_ref, &format!("backward_weight db {g:?}"));
    }

    /// Same convolutions take the implicit path, the rest patch tiles.
    #[test]
    fn forward_of_same_convolutions_matches_f64_reference(g in same(), with_bias in any::<bool>(), seed in any::<u64>()) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let bias = with_bias.then_some(&b[..]);
        let mut y = vec![f32::NAN; g.y_len()];
        conv2d_forward(&g, &x, &w, bias, &mut y);
        assert_close(&y, &forward_ref(&g, &x, &w, bias), &format!("conv2d_forward {g:?}"));
    }

    /// A stride-2 3x3 that halves an even image takes the polyphase route forward (its
    /// weight gradient patch tiles: the 2x2 on the polyphase components was measured 1.0 to
    /// 1.6 times slower there, 16 taps to the 3x3's 9): TensorFlow's and PyTorch's paddings,
    /// images from 2x2 up, sizes across row and channel blocks.
    #[test]
    fn halving_stride2_convolutions_match_f64_reference(
        (n, ci, co) in (1usize..=3, 1usize..=40, 1usize..=12),
        (h, w) in (1usize..=12, 1usize..=12),
        (top, left) in (0usize..=1, 0usize..=1),
        with_bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let g = geom(n, ci, co, (2 * h, 2 * w), (3, 3), 2, (top, 1, left, 1));
        prop_assert_eq!((g.out_h(), g.out_w()), (h, w));
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let wt = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let bias = with_bias.then_some(&b[..]);
        let mut y = vec![f32::NAN; g.y_len()];
        conv2d_forward(&g, &x, &wt, bias, &mut y);
        assert_close(&y, &forward_ref(&g, &x, &wt, bias), &format!("conv2d_forward {g:?}"));
        let dy = random_vec(&mut rng, g.y_len());
        let (mut dw, mut db) = (vec![f32::NAN; g.w_len()], vec![f32::NAN; g.c_out]);
        conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db));
        let (dw_ref, db_ref) = backward_weight_ref(&g, &x, &dy);
        assert_close(&dw, &dw_ref, &format!("conv2d_backward_weight dw {g:?}"));
        assert_close(&db, &db_ref, &format!("conv2d_backward_weight db {g:?}"));
    }

    #[test]
    fn weight_gradient_of_same_convolutions_matches_f64_reference(g in same(), seed in any::<u64>()) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let dy = random_vec(&mut rng, g.y_len());
        let mut dw = vec![f32::NAN; g.w_len()];
        let mut db = vec![f32::NAN; g.c_out];
        conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db));
        let (dw_ref, db_ref) = backward_weight_ref(&g, &x, &dy);
        assert_close(&dw, &dw_ref, &format!("conv2d_backward_weight dw {g:?}"));
        assert_close(&db, &db_ref, &format!("conv2d_backward_weight db {g:?}"));
    }

    /// The `_uninit` entry points write every element (a NaN left behind would show) and
    /// give the same bits as the initialised ones, on every path.
    #[test]
    fn uninit_entry_points_write_every_element(g in prop_oneof![geometry(), same()], seed in any::<u64>()) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let dy = random_vec(&mut rng, g.y_len());
        let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
            // SAFETY: filled with NaN before the call, so initialised whatever the kernel did.
            v.iter().map(|s| unsafe { s.assume_init() }.to_bits()).collect()
        };
        let mut y = vec![0.0; g.y_len()];
        conv2d_forward(&g, &x, &w, Some(&b), &mut y);
        let mut y_u = vec![MaybeUninit::new(f32::NAN); g.y_len()];
        conv2d_forward_uninit(&g, &x, &w, Some(&b), &mut y_u);
        prop_assert_eq!(bits(&y_u), y.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let mut dx = vec![0.0; g.x_len()];
        conv2d_backward_input(&g, &dy, &w, &mut dx);
        let mut dx_u = vec![MaybeUninit::new(f32::NAN); g.x_len()];
        conv2d_backward_input_uninit(&g, &dy, &w, &mut dx_u);
        prop_assert_eq!(bits(&dx_u), dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// ⟨conv(x; w), dy⟩ = ⟨x, ∂/∂x⟩ = ⟨w, ∂/∂w⟩ and ⟨bias, Σ dy⟩ = ⟨bias, db⟩: the backward
    /// kernels are the adjoints of the forward one, whatever the code looks like.
    #[test]
    fn backward_kernels_are_adjoints_of_forward((g, _tile, seed) in case()) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let dy = random_vec(&mut rng, g.y_len());

        let mut y = vec![0.0; g.y_len()];
        conv2d_forward(&g, &x, &w, None, &mut y);
        let mut dx = vec![0.0; g.x_len()];
        conv2d_backward_input(&g, &dy, &w, &mut dx);
        let mut dw = vec![0.0; g.w_len()];
        let mut db = vec![0.0; g.c_out];
        conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db));

        // Every side is a sum of the same terms w·x·dy; tolerate f32 rounding of that size.
        let y_abs: Vec<f64> = forward_ref(&g, &x, &w, None).scale;
        let scale: f64 = y_abs.iter().zip(&dy).map(|(&s, &d)| s * (d as f64).abs()).sum();
        let tol = 1e-5 * scale + 1e-12;
        let lhs = dot(&y, &dy);
        let by_input = dot(&x, &dx);
        let by_weight = dot(&w, &dw);
        prop_assert!((lhs - by_input).abs() <= tol, "<conv(x), dy> = {lhs}, <x, dx> = {by_input}");
        prop_assert!((lhs - by_weight).abs() <= tol, "<conv(x), dy> = {lhs}, <w, dw> = {by_weight}");

        let mut y_bias = vec![0.0; g.y_len()];
        let zeros = vec![0.0; g.w_len()];
        conv2d_forward(&g, &x, &zeros, Some(&b), &mut y_bias);
        let bias_tol = 1e-5 * abs_dot(&y_bias, &dy) + 1e-12;
        prop_assert!((dot(&y_bias, &dy) - dot(&b, &db)).abs() <= bias_tol);
    }
}

/// `conv2d_forward_plus` with the parts of `parts` (bit 0 bias, 1 image bias, 2 residual)
/// into a NaN-filled buffer, against the f64 reference plus those parts.
fn check_forward_plus(g: &Conv2dGeom, seed: u64, parts: usize) {
    let mut rng = crate::rng_from_seed(seed);
    let x = random_vec(&mut rng, g.x_len());
    let w = random_vec(&mut rng, g.w_len());
    let b = random_vec(&mut rng, g.c_out);
    let t = random_vec(&mut rng, g.n * g.c_out);
    let r = random_vec(&mut rng, g.y_len());
    let plus = ConvPlus {
        bias: (parts & 1 != 0).then_some(&b[..]),
        image_bias: (parts & 2 != 0).then_some(&t[..]),
        residual: (parts & 4 != 0).then_some(&r[..]),
    };
    let mut want = forward_ref(g, &x, &w, plus.bias);
    let plane = g.out_h() * g.out_w();
    for idx in 0..g.y_len() {
        if let Some(t) = plus.image_bias {
            want.add(idx, t[idx / plane] as f64);
        }
        if let Some(r) = plus.residual {
            want.add(idx, r[idx] as f64);
        }
    }
    let mut y = vec![f32::NAN; g.y_len()];
    conv2d_forward_plus(g, &x, &w, None, plus, as_uninit(&mut y));
    assert_close(&y, &want, &format!("forward_plus {g:?} parts {parts}"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The fused upsample + 3x3 against the f64 reference convolution of the upsampled
    /// input: images from 1x1 (too small for the implicit kernel: upsample, then convolve)
    /// to 15x15, odd and even, up to 20 channels.
    #[test]
    fn upsample_conv3x3_matches_f64_reference_of_the_upsampled_input(
        n in 1usize..=3, c_in in 1usize..=20, c_out in 1usize..=12, h in 1usize..=15, w in 1usize..=15,
        with_bias in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = crate::rng_from_seed(seed);
        let x = random_vec(&mut rng, n * c_in * h * w);
        let wt = random_vec(&mut rng, c_out * c_in * 9);
        let b = random_vec(&mut rng, c_out);
        let bias = with_bias.then_some(&b[..]);
        let mut up = vec![0.0f32; 4 * x.len()];
        crate::kernels::upsample_nearest2x(n * c_in, h, w, &x, &mut up);
        let g = geom(n, c_in, c_out, (2 * h, 2 * w), (3, 3), 1, (1, 1, 1, 1));
        let mut y = vec![f32::NAN; g.y_len()];
        upsample2x_conv3x3_forward_uninit(n, c_in, c_out, (h, w), &x, &wt, None, bias, as_uninit(&mut y));
        assert_close(&y, &forward_ref(&g, &up, &wt, bias), &format!("upsample + 3x3 {g:?}"));
    }
}

#[test]
fn forward_plus_adds_per_image_bias_and_residual_on_every_path() {
    // Images laid end to end in strips (14x14, 7x7: a strip's lanes span two images), whole
    // strips per image (8x8), the polyphase stride-2 path, 1x1 (packed), and a 5x5 stride-2
    // convolution (patch tiles).
    let cases = [
        geom(3, 20, 17, (14, 14), (3, 3), 1, (1, 1, 1, 1)),
        // Winograd's F(2x2, 3x3): 294 tiles of 2x2.
        geom(6, 20, 17, (14, 14), (3, 3), 1, (1, 1, 1, 1)),
        geom(3, 9, 11, (7, 7), (3, 3), 1, (1, 1, 1, 1)),
        geom(2, 40, 9, (8, 8), (3, 3), 1, (1, 1, 1, 1)),
        geom(2, 5, 12, (8, 8), (3, 3), 2, (0, 1, 0, 1)),
        geom(3, 7, 13, (14, 14), (1, 1), 1, (0, 0, 0, 0)),
        geom(2, 3, 5, (9, 9), (5, 5), 2, (2, 2, 2, 2)),
    ];
    for (k, g) in cases.iter().enumerate() {
        for parts in 0..8 {
            check_forward_plus(g, 100 + k as u64, parts);
        }
    }
}

/// The three entry points on geometries that take Winograd's F(2x2, 3x3) (the weight
/// gradient from 2,048 tiles), against the f64 reference: forward with every part, the
/// input gradient, the weight and bias gradients.
#[test]
fn winograd_geometries_match_f64_reference_through_the_entry_points() {
    for (k, g) in [
        geom(32, 16, 20, (16, 16), (3, 3), 1, (1, 1, 1, 1)),
        geom(90, 17, 16, (9, 9), (3, 3), 1, (1, 1, 1, 1)),
    ]
    .iter()
    .enumerate()
    {
        assert!(winograd::weight_applies(g), "{g:?} takes the Winograd weight gradient");
        for parts in [0, 3, 4, 7] {
            check_forward_plus(g, 200 + k as u64, parts);
        }
        let mut rng = crate::rng_from_seed(300 + k as u64);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let dy = random_vec(&mut rng, g.y_len());
        let mut dx = vec![f32::NAN; g.x_len()];
        conv2d_backward_input(g, &dy, &w, &mut dx);
        assert_close(&dx, &backward_input_ref(g, &dy, &w), &format!("dx {g:?}"));
        let (mut dw, mut db) = (vec![f32::NAN; g.w_len()], vec![f32::NAN; g.c_out]);
        conv2d_backward_weight(g, &x, &dy, &mut dw, Some(&mut db));
        let (want_dw, want_db) = backward_weight_ref(g, &x, &dy);
        assert_close(&dw, &want_dw, &format!("dw {g:?}"));
        assert_close(&db, &want_db, &format!("db {g:?}"));
    }
}

#[test]
fn same_padding_stride2_halves_the_image() {
    let g = geom(1, 1, 1, (8, 6), (3, 3), 2, (0, 1, 0, 1));
    assert_eq!((g.out_h(), g.out_w()), (4, 3));
}

#[test]
fn pointwise_conv_is_a_channel_matmul() {
    // 1x1 conv with w = [[1, 2]] and bias 0.5 maps channels (a, b) to a + 2b + 0.5.
    let g = geom(1, 2, 1, (1, 3), (1, 1), 1, (0, 0, 0, 0));
    let x = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
    let mut y = [0.0; 3];
    conv2d_forward(&g, &x, &[1.0, 2.0], Some(&[0.5]), &mut y);
    assert_eq!(y, [21.5, 42.5, 63.5]);
}

#[test]
#[should_panic(expected = "conv2d_forward: w has 8 elements")]
fn forward_panics_naming_the_mismatched_weight() {
    let g = geom(1, 1, 1, (4, 4), (3, 3), 1, (1, 1, 1, 1));
    let mut y = vec![0.0; g.y_len()];
    conv2d_forward(&g, &[0.0; 16], &[0.0; 8], None, &mut y);
}

#[test]
fn empty_batch_zeroes_the_weight_gradient() {
    let g = geom(0, 2, 3, (4, 4), (3, 3), 1, (1, 1, 1, 1));
    let mut dw = vec![f32::NAN; g.w_len()];
    let mut db = vec![f32::NAN; 3];
    conv2d_backward_weight(&g, &[], &[], &mut dw, Some(&mut db));
    assert!(dw.iter().chain(&db).all(|&v| v == 0.0));
}

#[test]
fn results_are_bit_identical_across_thread_counts() {
    // Seven images and a small tile: several chunks and several tiles per image, so the
    // weight gradient really reduces partials computed on different threads.
    let g = geom(7, 3, 4, (9, 9), (3, 3), 1, (1, 1, 1, 1));
    let mut rng = crate::rng_from_seed(11);
    let x = random_vec(&mut rng, g.x_len());
    let w = random_vec(&mut rng, g.w_len());
    let b = random_vec(&mut rng, g.c_out);
    let dy = random_vec(&mut rng, g.y_len());
    let run = |threads: usize| {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("building a rayon pool");
        pool.install(|| {
            let mut y = vec![0.0; g.y_len()];
            forward_tiled(&g, &x, &w, Some(&b), &mut y, 17);
            let mut dx = vec![0.0; g.x_len()];
            backward_input_tiled(&g, &dy, &w, &mut dx, 17);
            let mut dw = vec![0.0; g.w_len()];
            let mut db = vec![0.0; g.c_out];
            backward_weight_tiled(&g, &x, &dy, &mut dw, Some(&mut db), 17, 3);
            let mut dw_public = vec![0.0; g.w_len()];
            conv2d_backward_weight(&g, &x, &dy, &mut dw_public, None);
            [y, dx, dw, db, dw_public]
        })
    };
    let one = run(1);
    let three = run(3);
    for (a, b) in one.iter().zip(&three) {
        assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
fn winograd_results_are_bit_identical_across_thread_counts() {
    // 2,048 tiles: the forward pass, the input gradient and the weight gradient all take
    // F(2x2, 3x3), in several chunks and parts.
    let g = geom(32, 16, 20, (16, 16), (3, 3), 1, (1, 1, 1, 1));
    assert!(winograd::weight_applies(&g));
    let mut rng = crate::rng_from_seed(12);
    let x = random_vec(&mut rng, g.x_len());
    let w = random_vec(&mut rng, g.w_len());
    let b = random_vec(&mut rng, g.c_out);
    let dy = random_vec(&mut rng, g.y_len());
    let run = |threads: usize| {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("building a rayon pool");
        pool.install(|| {
            let mut y = vec![0.0; g.y_len()];
            conv2d_forward(&g, &x, &w, Some(&b), &mut y);
            let mut dx = vec![0.0; g.x_len()];
            conv2d_backward_input(&g, &dy, &w, &mut dx);
            let mut dw = vec![0.0; g.w_len()];
            conv2d_backward_weight(&g, &x, &dy, &mut dw, None);
            [y, dx, dw]
        })
    };
    let (one, three) = (run(1), run(3));
    for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(one.iter().zip(&three)) {
        assert!(
            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what} differs between 1 and 3 threads"
        );
    }
}
