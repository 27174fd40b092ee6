//! 2-D convolution (cross-correlation, as in PyTorch) with zero padding: forward, and the
//! gradients with respect to the input, the weight and the bias.
//!
//! Each image is a matrix product. With `K = C_in·kh·kw` rows of patches and `P = out_h·out_w`
//! output pixels, im2col lays the patches of image `n` out as `col_n: [K, P]`, and
//!
//! | kernel                         | product per image                                    |
//! |--------------------------------|------------------------------------------------------|
//! | [`conv2d_forward`]             | `y_n = W @ col_n (+ bias)`, `W` viewed as `[C_out, K]` |
//! | [`conv2d_backward_input`]      | `dx_n = col2im(Wᵀ @ dy_n)`                           |
//! | [`conv2d_backward_weight`]     | `dW = Σ_n dy_n @ col_nᵀ`, `db = Σ_{n,p} dy_n[:, p]`    |
//!
//! Which path runs:
//! - a 3x3 stride-1 convolution padded by 1 on every side, of at least 16 channels in and out on
//!   images of at least 7x7 with at least 256 output tiles of 2x2 in the batch (the U-Net's 3x3s
//!   above its smallest resolutions), and its input gradient: Winograd's F(2x2, 3x3) in
//!   `winograd/`, 2.25 times fewer multiply-adds; and its weight gradient too where the batch
//!   has at least 2,048 tiles;
//! - another stride-1 convolution whose output is as large as its input (every 3x3 of the U-Net but
//!   the downsample), on every instruction set: no patch matrix at all. `implicit/` reads each
//!   row of `col_n` as a shifted window of the input under a lane mask, for the forward pass,
//!   the input gradient (a forward convolution of `dy` with the flipped, transposed weights) and
//!   the weight gradient;
//! - otherwise the patch matrix is built a tile of output pixels at a time (a fixed number of
//!   columns chosen from the geometry alone), so the buffer stays cache-sized and is allocated
//!   once per rayon task, and multiplied by the packed micro-kernel of `packed.rs`. A 1x1,
//!   stride-1, unpadded convolution skips im2col: the image `[C_in, H·W]` already is `col_n`.
//!   The weight gradients of these take the general gemm (the `gemm` crate).
//!
//! The `*_uninit` entry points write into memory that need not be initialised (a fresh `Vec`'s
//! spare capacity), so the ops do not zero activations only to overwrite them. The forward entry
//! points take an optional [`PackedWeights`] (`kept.rs`) that keeps the weights' packing for the
//! next call with the same weights: a sampling run packs each layer once.
//!
//! Files: this one holds the geometry and the forward paths; `backward.rs` the gradients;
//! `im2col.rs` the patch tiles; `implicit/`, `winograd/`, `upsampled.rs` the kernels named above;
//! `kept.rs` the kept packings.
//!
//! Determinism: forward and input gradient write each image from one task. The weight gradient
//! either gives each weight to one task that sums every image in order (implicit path), or
//! splits the batch into chunks whose size depends only on `N`, computes each chunk's partial sum
//! serially, and adds the partials in chunk order; either way the result is bit-identical
//! whatever the number of rayon threads.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::as_uninit;
use super::packed::{gemm_packed_uninit, Init, PackedA};

mod backward;
mod im2col;
mod implicit;
mod kept;
mod upsampled;
mod winograd;

pub use backward::{conv2d_backward_input, conv2d_backward_input_uninit, conv2d_backward_weight};
use im2col::im2col_tile;
pub use kept::PackedWeights;
use kept::{key, with_packed};

/// Target size, in f32 elements, of one tile of the patch matrix (512 KiB: about an L2 cache).
const TILE_ELEMS: usize = 1 << 17;

/// A tile never has fewer output pixels than this, so each product stays wide enough for the
/// gemm micro-kernels even when `K` is large.
const MIN_TILE_PX: usize = 64;

/// The weight gradient is summed from at most this many per-chunk partials. The chunk size is
/// `ceil(N / MAX_WEIGHT_PARTIALS)`: a function of the batch size only, never of the thread count.
const MAX_WEIGHT_PARTIALS: usize = 16;

/// Geometry of a 2-D convolution (cross-correlation, as in PyTorch) with zero padding.
///
/// Input `x: [n, c_in, h, w]`, weight `w: [c_out, c_in, kh, kw]`, output
/// `y: [n, c_out, out_h, out_w]`. Padding may differ per side, so TensorFlow's "SAME" padding
/// for a stride-2 convolution of an even-sized image (`pad_top = pad_left = 0`,
/// `pad_bottom = pad_right = 1` for a 3x3 kernel) is expressible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Batch size `N`.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride, the same along both axes.
    pub stride: usize,
    /// Zero rows added above the input.
    pub pad_top: usize,
    /// Zero rows added below the input.
    pub pad_bottom: usize,
    /// Zero columns added left of the input.
    pub pad_left: usize,
    /// Zero columns added right of the input.
    pub pad_right: usize,
}

impl Conv2dGeom {
    /// Output height, `(h + pad_top + pad_bottom − kh) / stride + 1` (integer division).
    ///
    /// # Panics
    /// If `stride` is 0 or the kernel is taller than the padded input.
    pub fn out_h(&self) -> usize {
        assert!(self.stride > 0, "Conv2dGeom: stride must be positive");
        let padded = self.h + self.pad_top + self.pad_bottom;
        assert!(
            padded >= self.kh,
            "Conv2dGeom: kernel height {} exceeds padded input height {padded}",
            self.kh
        );
        (padded - self.kh) / self.stride + 1
    }

    /// Output width, `(w + pad_left + pad_right − kw) / stride + 1` (integer division).
    ///
    /// # Panics
    /// If `stride` is 0 or the kernel is wider than the padded input.
    pub fn out_w(&self) -> usize {
        assert!(self.stride > 0, "Conv2dGeom: stride must be positive");
        let padded = self.w + self.pad_left + self.pad_right;
        assert!(
            padded >= self.kw,
            "Conv2dGeom: kernel width {} exceeds padded input width {padded}",
            self.kw
        );
        (padded - self.kw) / self.stride + 1
    }

    /// Number of elements of the input `[N, C_in, H, W]`.
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }

    /// Number of elements of the weight `[C_out, C_in, kh, kw]`.
    pub fn w_len(&self) -> usize {
        self.c_out * self.c_in * self.kh * self.kw
    }

    /// Number of elements of the output `[N, C_out, out_h, out_w]`.
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w()
    }

    /// Rows of the patch matrix, `K = C_in·kh·kw`.
    fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output pixels per image, `P = out_h·out_w`.
    fn out_px(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// For a stride-1 geometry whose padding is at most `k − 1` on every side: the geometry
    /// of the forward convolution that computes its input gradient (input `dy`, `C_out` → `C_in`
    /// channels, padding `k − 1 − pad`, output the size of `x`). `None` otherwise.
    fn transposed(&self) -> Option<Conv2dGeom> {
        let fits = self.pad_top < self.kh
            && self.pad_bottom < self.kh
            && self.pad_left < self.kw
            && self.pad_right < self.kw;
        (self.stride == 1 && fits).then(|| Conv2dGeom {
            n: self.n,
            c_in: self.c_out,
            h: self.out_h(),
            w: self.out_w(),
            c_out: self.c_in,
            kh: self.kh,
            kw: self.kw,
            stride: 1,
            pad_top: self.kh - 1 - self.pad_top,
            pad_bottom: self.kh - 1 - self.pad_bottom,
            pad_left: self.kw - 1 - self.pad_left,
            pad_right: self.kw - 1 - self.pad_right,
        })
    }

    /// Whether the input image already is its patch matrix (1x1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == 1
            && self.pad_top == 0
            && self.pad_bottom == 0
            && self.pad_left == 0
            && self.pad_right == 0
    }

    /// Output pixels per patch-matrix tile: about `TILE_ELEMS / K`, at least `MIN_TILE_PX`, at
    /// most `P`. Depends on the geometry only.
    fn tile_px(&self) -> usize {
        let k = self.patch_len().max(1);
        (TILE_ELEMS / k).max(MIN_TILE_PX).min(self.out_px()).max(1)
    }

    /// Checks the geometry describes a convolution these kernels handle.
    fn validate(&self, kernel: &str) {
        assert!(
            self.c_in > 0 && self.h > 0 && self.w > 0 && self.c_out > 0 && self.kh > 0 && self.kw > 0,
            "{kernel}: every size but n must be positive, got {self:?}"
        );
        // out_h / out_w check the stride and that the kernel fits the padded input.
        let _ = (self.out_h(), self.out_w());
    }
}

/// Forward convolution: `y[n, co, oh, ow] = bias[co] + Σ_{ci,i,j} w[co, ci, i, j] ·
/// x_padded[n, ci, oh·stride + i, ow·stride + j]`.
///
/// Shapes: `x: [N, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `bias: [C_out]`,
/// `y: [N, C_out, out_h, out_w]` (overwritten). Parallel over images.
///
/// # Panics
/// If a slice length does not match the geometry, or the geometry is degenerate (a zero size
/// other than `n`, zero stride, a kernel larger than the padded input).
pub fn conv2d_forward(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    #[cfg(feature = "wgpu")]
    if crate::gpu::conv2d_forward(g, x, w, bias, y) {
        return;
    }
    if implicit::applies(g) || polyphase(g).is_some() {
        forward_any(g, x, w, None, ConvPlus { bias, ..ConvPlus::default() }, as_uninit(y));
    } else {
        forward_tiled(g, x, w, bias, y, g.tile_px());
    }
}

/// [`conv2d_forward`] into memory that need not be initialised (a fresh `Vec`'s spare
/// capacity): on return every element of `y` is written. The implicit path writes each output
/// once and never reads `y` first, so the buffer is not zeroed beforehand.
///
/// # Panics
/// As [`conv2d_forward`].
pub fn conv2d_forward_uninit(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    conv2d_forward_plus(g, x, w, None, ConvPlus { bias, ..ConvPlus::default() }, y);
}

/// `y = conv2d(upsample_nearest2x(x), w) + bias` for a 3x3 convolution with padding 1 (the
/// U-Net's upsample block): `x: [n, c_in, h, w]`, `w: [c_out, c_in, 3, 3]`, `bias: [c_out]`,
/// `y: [n, c_out, 2h, 2w]`, every element written. Where the implicit kernels apply (an
/// image of 16 pixels or more) it runs as four 2x2 convolutions of `x` (one per output phase, the
/// 3x3 weights folded), a quarter of the pixels and 2.25 times fewer multiply-adds; else it
/// upsamples and convolves. The two agree to rounding. `kept` keeps the weights' packing for
/// the next call with the same weights ([`PackedWeights`]).
///
/// # Panics
/// If a slice length does not match the shapes.
#[allow(clippy::too_many_arguments)]
pub fn upsample2x_conv3x3_forward_uninit(
    n: usize,
    c_in: usize,
    c_out: usize,
    (h, w): (usize, usize),
    x: &[f32],
    weight: &[f32],
    kept: Option<&PackedWeights>,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    let g = Conv2dGeom {
        n,
        c_in,
        h: 2 * h,
        w: 2 * w,
        c_out,
        kh: 3,
        kw: 3,
        stride: 1,
        pad_top: 1,
        pad_bottom: 1,
        pad_left: 1,
        pad_right: 1,
    };
    g.validate("upsample2x_conv3x3");
    assert_eq!(
        x.len(),
        n * c_in * h * w,
        "upsample2x_conv3x3: x has {} elements, not [n, c_in, h, w]",
        x.len()
    );
    assert_eq!(
        weight.len(),
        g.w_len(),
        "upsample2x_conv3x3: w has {} elements, not [c_out, c_in, 3, 3]",
        weight.len()
    );
    assert_eq!(y.len(), g.y_len(), "upsample2x_conv3x3: y has {} elements, not [n, c_out, 2h, 2w]", y.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "upsample2x_conv3x3: bias has {} elements, C_out is {c_out}", b.len());
    }
    if n == 0 {
        return;
    }
    if upsampled::applies(n, c_in, c_out, h, w) {
        let phases = || upsampled::pack(c_in, c_out, weight);
        return with_packed(
            kept,
            |k| &k.upsampled,
            weight,
            key(&g),
            phases,
            |packed| upsampled::forward(n, c_in, c_out, (h, w), x, packed, bias, y),
        );
    }
    let mut up = Vec::with_capacity(g.x_len());
    super::upsample::upsample_nearest2x_uninit(n * c_in, h, w, x, &mut up.spare_capacity_mut()[..g.x_len()]);
    // SAFETY: the upsampling wrote all of it.
    unsafe { up.set_len(g.x_len()) };
    conv2d_forward_plus(&g, &up, weight, kept, ConvPlus { bias, ..ConvPlus::default() }, y);
}

/// What a forward convolution adds to its products, each part optional:
/// `y[n, co, oh, ow] = bias[co] + image_bias[n, co] + residual[n, co, oh, ow] + Σ w·x`.
/// The U-Net's residual blocks add the timestep embedding per image and channel after their
/// first convolution, and the skip connection after their second: done here, each costs no
/// pass over memory of its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvPlus<'a> {
    /// `[C_out]`.
    pub bias: Option<&'a [f32]>,
    /// `[N, C_out]`.
    pub image_bias: Option<&'a [f32]>,
    /// `[N, C_out, out_h, out_w]`, the output's shape.
    pub residual: Option<&'a [f32]>,
}

/// [`conv2d_forward_uninit`] with the additions of `plus` (see [`ConvPlus`]): on return every
/// element of `y` is written. `kept` keeps the weights' packing for the next call with the same
/// weights ([`PackedWeights`]: a sampling run's).
///
/// # Panics
/// As [`conv2d_forward`], and if `plus`'s image bias is not `[N, C_out]` or its residual not
/// the output's size.
pub fn conv2d_forward_plus(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    kept: Option<&PackedWeights>,
    plus: ConvPlus<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    check_forward(g, x, w, plus.bias, y.len());
    if let Some(t) = plus.image_bias {
        assert_eq!(
            t.len(),
            g.n * g.c_out,
            "conv2d_forward: image bias has {} elements, not [N, C_out]",
            t.len()
        );
    }
    if let Some(r) = plus.residual {
        assert_eq!(r.len(), y.len(), "conv2d_forward: residual has {} elements, y {}", r.len(), y.len());
    }
    #[cfg(feature = "wgpu")]
    {
        let yz = zero_init(y);
        if crate::gpu::conv2d_forward(g, x, w, plus.bias, yz) {
            add_after(g, &ConvPlus { bias: None, ..plus }, yz);
            return;
        }
    }
    forward_any(g, x, w, kept, plus, y);
}

/// `y += image_bias[n, co] + residual`: the additions of `plus` other than the bias, for the
/// paths that do not fuse them.
#[cfg(feature = "wgpu")]
fn add_after(g: &Conv2dGeom, plus: &ConvPlus<'_>, y: &mut [f32]) {
    if g.n == 0 || (plus.image_bias.is_none() && plus.residual.is_none()) {
        return;
    }
    let plane = g.out_px();
    y.par_chunks_mut(plane).enumerate().for_each(|(k, out)| {
        let t = plus.image_bias.map_or(0.0, |t| t[k]);
        match plus.residual {
            Some(r) => {
                for (o, &v) in out.iter_mut().zip(&r[k * plane..(k + 1) * plane]) {
                    *o += t + v;
                }
            }
            None => out.iter_mut().for_each(|o| *o += t),
        }
    });
}

/// The bias of [`implicit::Start`] for `plus`: the per-image sums `bias + image_bias` when
/// there is an image bias (stride `C_out`), else the bias itself (stride 0).
fn start_bias(g: &Conv2dGeom, plus: &ConvPlus<'_>) -> (Option<Vec<f32>>, usize) {
    match plus.image_bias {
        None => (None, 0),
        Some(t) => {
            let sums =
                t.iter().enumerate().map(|(i, &v)| plus.bias.map_or(0.0, |b| b[i % g.c_out]) + v).collect();
            (Some(sums), g.c_out)
        }
    }
}

/// The forward convolution on the fastest CPU path for the geometry: the implicit kernel of
/// `implicit/` for a stride-1 same convolution or (through its polyphase
/// components) a stride-2 3x3 that halves the image, else patch tiles.
fn forward_any(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    kept: Option<&PackedWeights>,
    plus: ConvPlus<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    let (sums, image_stride) = start_bias(g, &plus);
    let start =
        implicit::Start { bias: sums.as_deref().or(plus.bias), image_stride, residual: plus.residual };
    if let Some(pg) = polyphase(g) {
        check_forward(g, x, w, plus.bias, y.len());
        if g.n > 0 {
            let xp = polyphase_input(g, x);
            let (c_in, pt, pl) = (g.c_in, g.pad_top, g.pad_left);
            let w_at = |r: usize, c4: usize, t: usize| {
                // Tap (a, b) of phase (p, q) is tap (2a + p − pt, 2b + q − pl) of the 3x3.
                let (c, p, q, a, b) = (c4 / 4, c4 / 2 % 2, c4 % 2, t / 2, t % 2);
                let (i, j) = ((2 * a + p).wrapping_sub(pt), (2 * b + q).wrapping_sub(pl));
                if i < 3 && j < 3 {
                    w[(r * c_in + c) * 9 + i * 3 + j]
                } else {
                    0.0
                }
            };
            with_packed(
                kept,
                |k| &k.polyphase,
                w,
                key(g),
                || implicit::pack(&pg, w_at),
                |a| implicit::forward_packed(&pg, &xp, a, start, y),
            );
        }
        return;
    }
    if implicit::applies(g) {
        check_forward(g, x, w, plus.bias, y.len());
        if g.n > 0 {
            let (c_in, taps) = (g.c_in, g.kh * g.kw);
            let w_at = |r, c, t| w[(r * c_in + c) * taps + t];
            if winograd::applies(g) {
                with_packed(
                    kept,
                    |k| &k.winograd,
                    w,
                    key(g),
                    || winograd::pack(g, w_at),
                    |u| winograd::forward_packed(g, x, u, start, y),
                );
            } else {
                with_packed(
                    kept,
                    |k| &k.implicit,
                    w,
                    key(g),
                    || implicit::pack(g, w_at),
                    |a| implicit::forward_packed(g, x, a, start, y),
                );
            }
        }
        return;
    }
    check_forward(g, x, w, plus.bias, y.len());
    forward_packed(g, x, w, kept, start, y, g.tile_px());
}

/// A stride-1 "same" convolution for which [`implicit::applies`] holds: through Winograd's
/// F(2x2, 3x3) where that applies (a 3x3 padded by 1 with enough channels), else the implicit
/// kernel.
fn same_conv(
    g: &Conv2dGeom,
    x: &[f32],
    w_at: impl Fn(usize, usize, usize) -> f32 + Sync,
    start: implicit::Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    if winograd::applies(g) {
        winograd::forward(g, x, w_at, start, y)
    } else {
        implicit::forward(g, x, w_at, start, y)
    }
}

/// A 3x3 stride-2 convolution that halves an even-sized image (TensorFlow's "SAME" padding
/// `(0, 1)` or PyTorch's `(1, 1)` on each axis) is a stride-1 2x2 "same" convolution of the
/// image's four polyphase components `X_pq[u, v] = x[2u + p, 2v + q]`, stacked as `4·C_in`
/// channels: output `o` reads `x[2o + i − pt]`, and `i − pt = 2a + p` splits the tap into a
/// shift `a` of a component and its phase `p`. Seven of the sixteen taps per channel are zero
/// (78% more multiply-adds than the 3x3), but the implicit kernel runs them at several times
/// the speed of the patch tiles a stride-2 convolution otherwise takes. The 2x2 geometry, when
/// this applies and the implicit path is available.
fn polyphase(g: &Conv2dGeom) -> Option<Conv2dGeom> {
    let halves = g.stride == 2
        && (g.kh, g.kw) == (3, 3)
        && g.h.is_multiple_of(2)
        && g.w.is_multiple_of(2)
        && g.pad_top <= 1
        && g.pad_left <= 1
        && (g.out_h(), g.out_w()) == (g.h / 2, g.w / 2);
    let pg = Conv2dGeom {
        n: g.n,
        c_in: 4 * g.c_in,
        h: g.h / 2,
        w: g.w / 2,
        c_out: g.c_out,
        kh: 2,
        kw: 2,
        stride: 1,
        pad_top: g.pad_top,
        pad_bottom: 1 - g.pad_top.min(1),
        pad_left: g.pad_left,
        pad_right: 1 - g.pad_left.min(1),
    };
    (halves && implicit::applies(&pg)).then_some(pg)
}

/// `x` as its polyphase components: `[N, C, H, W] → [N, 4·C, H/2, W/2]` with channel
/// `4c + 2p + q` holding `x[n, c, 2u + p, 2v + q]`. Parallel over input planes.
fn polyphase_input(g: &Conv2dGeom, x: &[f32]) -> Vec<f32> {
    let (h2, w2) = (g.h / 2, g.w / 2);
    let plane = g.h * g.w;
    let mut xp: Vec<f32> = Vec::with_capacity(x.len());
    xp.spare_capacity_mut()[..x.len()].par_chunks_mut(plane).zip(x.par_chunks(plane)).for_each(
        |(out, src)| {
            // Phases (p, 0) and (p, 1) are the even and odd columns of the rows 2u + p.
            for (p, pair) in out.chunks_mut(2 * h2 * w2).enumerate() {
                let (even, odd) = pair.split_at_mut(h2 * w2);
                for ((even, odd), src_row) in
                    even.chunks_mut(w2).zip(odd.chunks_mut(w2)).zip(src[p * g.w..].chunks(2 * g.w))
                {
                    for ((e, o), two) in
                        even.iter_mut().zip(odd.iter_mut()).zip(src_row[..g.w].chunks_exact(2))
                    {
                        e.write(two[0]);
                        o.write(two[1]);
                    }
                }
            }
        },
    );
    // SAFETY: each plane's four phases cover it, every element written just above.
    unsafe { xp.set_len(x.len()) };
    xp
}

/// Zeroes `y` (in parallel chunks) and returns it as initialised.
fn zero_init(y: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    y.par_chunks_mut(1 << 14).for_each(|part| {
        for slot in part {
            slot.write(0.0);
        }
    });
    // SAFETY: every element was written just above.
    unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Panics unless the slices have the lengths the geometry gives them.
fn check_forward(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, y_len: usize) {
    g.validate("conv2d_forward");
    assert_eq!(
        x.len(),
        g.x_len(),
        "conv2d_forward: x has {} elements, geometry {g:?} needs [N, C_in, H, W]",
        x.len()
    );
    assert_eq!(
        w.len(),
        g.w_len(),
        "conv2d_forward: w has {} elements, geometry {g:?} needs [C_out, C_in, kh, kw]",
        w.len()
    );
    assert_eq!(
        y_len,
        g.y_len(),
        "conv2d_forward: y has {y_len} elements, geometry {g:?} needs [N, C_out, out_h, out_w]"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), g.c_out, "conv2d_forward: bias has {} elements, C_out is {}", b.len(), g.c_out);
    }
}

fn forward_tiled(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], tile_px: usize) {
    check_forward(g, x, w, bias, y.len());
    if g.n == 0 {
        return;
    }
    let start = implicit::Start { bias, ..implicit::Start::default() };
    forward_packed(g, x, w, None, start, as_uninit(y), tile_px);
}

/// The patch-tile path on the kernel of `packed.rs`: the weights packed once, every
/// tile's product reading them and the patch tile (or, for a 1x1 convolution, the input) in
/// place, each output written once without being read first, so `y` need not be initialised.
/// The sums start from `start` (as in the implicit path). The caller has checked the lengths.
fn forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    kept: Option<&PackedWeights>,
    start: implicit::Start<'_>,
    y: &mut [MaybeUninit<f32>],
    tile_px: usize,
) {
    if g.n == 0 {
        return;
    }
    let k = g.patch_len();
    let tile_px = if g.is_pointwise() { g.out_px() } else { tile_px };
    let pack = || PackedA::new(w, g.c_out, k, k, 1);
    with_packed(
        kept,
        |k| &k.tiled,
        w,
        key(g),
        pack,
        |w_packed| forward_tiles(g, x, w_packed, start, y, tile_px),
    )
}

/// [`forward_packed`] with the weights packed.
fn forward_tiles(
    g: &Conv2dGeom,
    x: &[f32],
    w_packed: &PackedA,
    start: implicit::Start<'_>,
    y: &mut [MaybeUninit<f32>],
    tile_px: usize,
) {
    let (k, px) = (g.patch_len(), g.out_px());
    let pointwise = g.is_pointwise();
    let x_img_len = g.c_in * g.h * g.w;
    let y_img_len = g.c_out * px;
    y.par_chunks_mut(y_img_len).zip(x.par_chunks(x_img_len)).enumerate().for_each_init(
        || if pointwise { Vec::new() } else { vec![0.0; k * tile_px] },
        |col, (n, (y_img, x_img))| {
            let bias = start.bias.map(|b| &b[n * start.image_stride..]);
            let residual = start.residual.map(|r| &r[n * y_img_len..(n + 1) * y_img_len]);
            for p0 in (0..px).step_by(tile_px) {
                let p1 = px.min(p0 + tile_px);
                let t = p1 - p0;
                let (b, ldb) = if pointwise {
                    (&x_img[p0..], px)
                } else {
                    im2col_tile(g, x_img, p0, p1, &mut col[..k * t]);
                    (&col[..k * t], t)
                };
                let init = match (bias, residual) {
                    (None, None) => Init::Zero,
                    (Some(b), None) => Init::Bias(b),
                    (bias, Some(r)) => Init::Plus { bias, residual: &r[p0..] },
                };
                gemm_packed_uninit(w_packed, b, ldb, t, &mut y_img[p0..], px, init);
            }
        },
    );
}

#[cfg(test)]
mod tests;
