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
//!   images of at least 8x8 (the U-Net's 3x3s above its smallest resolutions), and its input
//!   gradient: Winograd's F(2x2, 3x3) in `winograd.rs`, 2.25 times fewer multiply-adds; and its
//!   weight gradient too where the batch has at least 2,048 tiles of 2x2 pixels;
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
//! spare capacity), so the ops do not zero activations only to overwrite them.
//!
//! Determinism: forward and input gradient write each image from one task. The weight gradient
//! either gives each weight to one task that sums every image in order (implicit path), or
//! splits the batch into chunks whose size depends only on `N`, computes each chunk's partial sum
//! serially, and adds the partials in chunk order; either way the result is bit-identical
//! whatever the number of rayon threads.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::as_uninit;
use super::gemm::{gemm, MatMut, MatRef};
use super::math::sum_f64_lanes;
use super::packed::{gemm_packed, gemm_packed_uninit, Init, PackedA};

mod implicit;
mod kept;
mod upsampled;
mod winograd;

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

/// Output columns `ow` of one kernel column `j` whose input column lies inside the image: the
/// half-open range `lo..hi` of `ow` with `0 <= ow·stride + j − pad_left < w`, clipped to `out_w`.
fn valid_cols(g: &Conv2dGeom, j: usize, out_w: usize) -> (usize, usize) {
    let s = g.stride;
    let lo = g.pad_left.saturating_sub(j).div_ceil(s);
    let hi = (g.w + g.pad_left).saturating_sub(j).div_ceil(s).min(out_w);
    (lo.min(hi), hi)
}

/// Visits the segments of one patch-matrix row for the output pixels `p0..p1`: for each output
/// row `oh` the tile touches, calls `f(seg_start, oh, ow_start, ow_end)`, where `seg_start` is the
/// offset of `ow_start` within the tile.
fn for_each_row_segment(out_w: usize, p0: usize, p1: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut p = p0;
    while p < p1 {
        let (oh, ow_start) = (p / out_w, p % out_w);
        let ow_end = out_w.min(ow_start + (p1 - p));
        f(p - p0, oh, ow_start, ow_end);
        p += ow_end - ow_start;
    }
}

/// Input row read by output row `oh` at kernel row `i`, if it is inside the image.
fn input_row(g: &Conv2dGeom, oh: usize, i: usize) -> Option<usize> {
    (oh * g.stride + i).checked_sub(g.pad_top).filter(|&ih| ih < g.h)
}

/// Writes the patch-matrix columns `p0..p1` of one image into `col: [K, p1 − p0]`.
///
/// `col[(ci·kh + i)·kw + j, p − p0] = x_padded[ci, oh·stride + i, ow·stride + j]` with
/// `(oh, ow) = (p / out_w, p % out_w)`; padding reads as zero.
fn im2col_tile(g: &Conv2dGeom, x_img: &[f32], p0: usize, p1: usize, col: &mut [f32]) {
    if g.stride == 1 && g.out_w() == g.w {
        im2col_tile_same_width(g, x_img, p0, p1, col);
        return;
    }
    let (out_w, t, s, plane) = (g.out_w(), p1 - p0, g.stride, g.h * g.w);
    for ci in 0..g.c_in {
        let x_plane = &x_img[ci * plane..(ci + 1) * plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let dst = &mut col[row * t..(row + 1) * t];
                let (lo, hi) = valid_cols(g, j, out_w);
                for_each_row_segment(out_w, p0, p1, |start, oh, ow_start, ow_end| {
                    let seg = &mut dst[start..start + (ow_end - ow_start)];
                    let Some(ih) = input_row(g, oh, i) else {
                        seg.fill(0.0);
                        return;
                    };
                    let x_row = &x_plane[ih * g.w..(ih + 1) * g.w];
                    let (a, b) = (lo.clamp(ow_start, ow_end), hi.clamp(ow_start, ow_end));
                    seg[..a - ow_start].fill(0.0);
                    seg[b - ow_start..].fill(0.0);
                    let inside = &mut seg[a - ow_start..b - ow_start];
                    if a < b {
                        // a >= lo guarantees a·s + j >= pad_left.
                        let iw0 = a * s + j - g.pad_left;
                        if s == 1 {
                            inside.copy_from_slice(&x_row[iw0..iw0 + (b - a)]);
                        } else if s == 2 {
                            // Pairs: a constant stride the compiler vectorises (shuffles).
                            let src = &x_row[iw0..];
                            for (d, pair) in inside.iter_mut().zip(src.chunks(2)) {
                                *d = pair[0];
                            }
                        } else {
                            for (d, &v) in inside.iter_mut().zip(x_row[iw0..].iter().step_by(s)) {
                                *d = v;
                            }
                        }
                    }
                });
            }
        }
    }
}

/// [`im2col_tile`] for a stride-1 convolution whose output is as wide as its input (a "same"
/// convolution, `pad_left + pad_right = kw − 1`, every 3x3 of the U-Net but the downsample).
///
/// Then output pixel `p = oh·w + ow` of patch row `(ci, i, j)` reads input element
/// `p + (i − pad_top)·w + (j − pad_left)` of plane `ci`: one contiguous copy per patch row
/// instead of one per output row, after which the columns that fell off the left or right edge
/// (and wrapped to the neighbouring row) are zeroed. Writes exactly what the general path
/// writes.
fn im2col_tile_same_width(g: &Conv2dGeom, x_img: &[f32], p0: usize, p1: usize, col: &mut [f32]) {
    let (w, t, plane) = (g.w, p1 - p0, g.h * g.w);
    for ci in 0..g.c_in {
        let x_plane = &x_img[ci * plane..(ci + 1) * plane];
        for i in 0..g.kh {
            // Output rows whose input row `oh + i − pad_top` is inside the image, as pixels.
            let oh_lo = g.pad_top.saturating_sub(i);
            let oh_hi = (g.h + g.pad_top).saturating_sub(i);
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let dst = &mut col[row * t..(row + 1) * t];
                // Shift from output pixel to input element, kept non-negative by adding `base`.
                let base = g.pad_top * w + g.pad_left;
                let shift = i * w + j; // input index = p + shift − base
                                       // Pixels with a valid input row, also clipped so the input index stays in the
                                       // plane (the clipped pixels are exactly the edge columns zeroed below).
                let lo = (oh_lo * w).max(base.saturating_sub(shift)).clamp(p0, p1);
                let hi = (oh_hi * w).min((plane + base).saturating_sub(shift)).clamp(lo, p1);
                dst[..lo - p0].fill(0.0);
                dst[hi - p0..].fill(0.0);
                if lo < hi {
                    dst[lo - p0..hi - p0].copy_from_slice(&x_plane[lo + shift - base..hi + shift - base]);
                }
                // Columns ow with ow + j − pad_left outside 0..w read the neighbouring row.
                let (c_lo, c_hi) = valid_cols(g, j, w);
                let first_row = p0 / w;
                for oh in first_row..p1.div_ceil(w) {
                    let row_start = oh * w;
                    let bad = (0..c_lo).chain(c_hi..w);
                    for ow in bad {
                        let p = row_start + ow;
                        if (p0..p1).contains(&p) {
                            dst[p - p0] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the patch-matrix columns `p0..p1` (`col: [K, p1 − p0]`) back onto the image they were
/// read from: the adjoint of [`im2col_tile`]. Entries that came from padding are dropped.
fn col2im_tile_add(g: &Conv2dGeom, col: &mut [f32], p0: usize, p1: usize, dx_img: &mut [f32]) {
    if g.stride == 1 && g.out_w() == g.w {
        col2im_tile_add_same_width(g, col, p0, p1, dx_img);
        return;
    }
    let (out_w, t, s, plane) = (g.out_w(), p1 - p0, g.stride, g.h * g.w);
    for ci in 0..g.c_in {
        let dx_plane = &mut dx_img[ci * plane..(ci + 1) * plane];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let src = &col[row * t..(row + 1) * t];
                let (lo, hi) = valid_cols(g, j, out_w);
                for_each_row_segment(out_w, p0, p1, |start, oh, ow_start, ow_end| {
                    let Some(ih) = input_row(g, oh, i) else {
                        return;
                    };
                    let (a, b) = (lo.clamp(ow_start, ow_end), hi.clamp(ow_start, ow_end));
                    if a >= b {
                        return;
                    }
                    let seg = &src[start + (a - ow_start)..start + (b - ow_start)];
                    let dx_row = &mut dx_plane[ih * g.w..(ih + 1) * g.w];
                    let iw0 = a * s + j - g.pad_left;
                    if s == 1 {
                        for (d, &v) in dx_row[iw0..iw0 + seg.len()].iter_mut().zip(seg) {
                            *d += v;
                        }
                    } else {
                        for (d, &v) in dx_row[iw0..].iter_mut().step_by(s).zip(seg) {
                            *d += v;
                        }
                    }
                });
            }
        }
    }
}

/// [`col2im_tile_add`] for the geometries of [`im2col_tile_same_width`]: each patch row is added
/// onto its input plane as one contiguous shifted range. The entries of the columns that wrap
/// to the neighbouring row (padding reads in the forward pass) are first set to zero in `col`,
/// so they add nothing; every other entry is added in the same order as the general path, so
/// the result is the same up to the sign of zero sums.
fn col2im_tile_add_same_width(g: &Conv2dGeom, col: &mut [f32], p0: usize, p1: usize, dx_img: &mut [f32]) {
    let (w, t, plane) = (g.w, p1 - p0, g.h * g.w);
    let base = g.pad_top * w + g.pad_left;
    for ci in 0..g.c_in {
        let dx_plane = &mut dx_img[ci * plane..(ci + 1) * plane];
        for i in 0..g.kh {
            let oh_lo = g.pad_top.saturating_sub(i);
            let oh_hi = (g.h + g.pad_top).saturating_sub(i);
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let src = &mut col[row * t..(row + 1) * t];
                let shift = i * w + j; // input index = p + shift − base
                let lo = (oh_lo * w).max(base.saturating_sub(shift)).clamp(p0, p1);
                let hi = (oh_hi * w).min((plane + base).saturating_sub(shift)).clamp(lo, p1);
                if lo >= hi {
                    continue;
                }
                let (c_lo, c_hi) = valid_cols(g, j, w);
                if c_lo > 0 || c_hi < w {
                    for oh in lo / w..hi.div_ceil(w) {
                        for ow in (0..c_lo).chain(c_hi..w) {
                            let p = oh * w + ow;
                            if (lo..hi).contains(&p) {
                                src[p - p0] = 0.0;
                            }
                        }
                    }
                }
                let dst = &mut dx_plane[lo + shift - base..hi + shift - base];
                for (d, &v) in dst.iter_mut().zip(&src[lo - p0..hi - p0]) {
                    *d += v;
                }
            }
        }
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

/// Gradient of a convolution with respect to its input: `dx = ∂(Σ dy ⊙ y)/∂x`, i.e.
/// `dx[n, ci, ih, iw] = Σ w[co, ci, i, j] · dy[n, co, oh, ow]` over every `(co, i, j, oh, ow)`
/// with `oh·stride + i − pad_top = ih` and `ow·stride + j − pad_left = iw`.
///
/// Shapes: `dy: [N, C_out, out_h, out_w]`, `w: [C_out, C_in, kh, kw]`, `dx: [N, C_in, H, W]`
/// (overwritten). Parallel over images.
///
/// # Panics
/// If a slice length does not match the geometry, or the geometry is degenerate.
pub fn conv2d_backward_input(g: &Conv2dGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    #[cfg(feature = "wgpu")]
    if crate::gpu::conv2d_backward_input(g, dy, w, dx) {
        return;
    }
    if let Some(flipped) = as_forward(g) {
        return backward_input_as_forward(g, &flipped, dy, w, as_uninit(dx));
    }
    backward_input_tiled(g, dy, w, dx, g.tile_px());
}

/// [`conv2d_backward_input`] into memory that need not be initialised; on return every element
/// of `dx` is written.
///
/// # Panics
/// As [`conv2d_backward_input`].
pub fn conv2d_backward_input_uninit(g: &Conv2dGeom, dy: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) {
    #[cfg(feature = "wgpu")]
    conv2d_backward_input(g, dy, w, zero_init(dx));
    #[cfg(not(feature = "wgpu"))]
    match as_forward(g) {
        Some(flipped) => backward_input_as_forward(g, &flipped, dy, w, dx),
        None => backward_input_tiled(g, dy, w, zero_init(dx), g.tile_px()),
    }
}

/// The geometry of the forward convolution that computes this one's input gradient, when that
/// route is the faster one here (stride 1, a packed micro-kernel).
fn as_forward(g: &Conv2dGeom) -> Option<Conv2dGeom> {
    (g.stride == 1 && !g.is_pointwise()).then(|| g.transposed()).flatten()
}

/// The input gradient of a stride-1 convolution as a forward convolution: `dx` is the full
/// correlation of `dy` with the weights flipped in both spatial axes and with `C_in`/`C_out`
/// swapped, `w'[ci, co, i, j] = w[co, ci, kh−1−i, kw−1−j]`, padded by `k − 1 − pad` on each side
/// (`g'` from [`Conv2dGeom::transposed`]). This runs on the forward path (patch tiles and the
/// packed micro-kernel, each output written once) instead of a product followed by a col2im
/// scatter-add that reads and writes `dx` once per kernel tap.
fn backward_input_as_forward(
    g: &Conv2dGeom,
    gt: &Conv2dGeom,
    dy: &[f32],
    w: &[f32],
    dx: &mut [MaybeUninit<f32>],
) {
    assert_eq!(dy.len(), g.y_len(), "conv2d_backward_input: dy has {} elements, geometry {g:?}", dy.len());
    assert_eq!(w.len(), g.w_len(), "conv2d_backward_input: w has {} elements, geometry {g:?}", w.len());
    assert_eq!(dx.len(), g.x_len(), "conv2d_backward_input: dx has {} elements, geometry {g:?}", dx.len());
    if implicit::applies(gt) {
        g.validate("conv2d_backward_input");
        if g.n > 0 {
            // w'[ci, co, t] = w[co, ci, taps − 1 − t]: flipping both axes reverses the tap index.
            let (c_in, taps) = (g.c_in, g.kh * g.kw);
            let start = implicit::Start::default();
            same_conv(gt, dy, |r, c, t| w[(c * c_in + r) * taps + (taps - 1 - t)], start, dx);
        }
        return;
    }
    let (kh, kw) = (g.kh, g.kw);
    let mut flipped = vec![0.0f32; w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            for i in 0..kh {
                for j in 0..kw {
                    flipped[((ci * g.c_out + co) * kh + i) * kw + j] =
                        w[((co * g.c_in + ci) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                }
            }
        }
    }
    forward_any(gt, dy, &flipped, None, ConvPlus::default(), dx);
}

fn backward_input_tiled(g: &Conv2dGeom, dy: &[f32], w: &[f32], dx: &mut [f32], tile_px: usize) {
    g.validate("conv2d_backward_input");
    assert_eq!(
        dy.len(),
        g.y_len(),
        "conv2d_backward_input: dy has {} elements, geometry {g:?} needs [N, C_out, out_h, out_w]",
        dy.len()
    );
    assert_eq!(
        w.len(),
        g.w_len(),
        "conv2d_backward_input: w has {} elements, geometry {g:?} needs [C_out, C_in, kh, kw]",
        w.len()
    );
    assert_eq!(
        dx.len(),
        g.x_len(),
        "conv2d_backward_input: dx has {} elements, geometry {g:?} needs [N, C_in, H, W]",
        dx.len()
    );
    if g.n == 0 {
        return;
    }
    let (k, px) = (g.patch_len(), g.out_px());
    let pointwise = g.is_pointwise();
    // Wᵀ packed once (see `conv2d_forward`).
    let wt_packed = PackedA::new(w, k, g.c_out, 1, k);
    let x_img_len = g.c_in * g.h * g.w;
    dx.par_chunks_mut(x_img_len).zip(dy.par_chunks(g.c_out * px)).for_each_init(
        || {
            if pointwise {
                Vec::new()
            } else {
                vec![0.0; k * tile_px]
            }
        },
        |dcol, (dx_img, dy_img)| {
            if pointwise {
                // The image is its own patch matrix: dx_n = Wᵀ @ dy_n, no col2im.
                gemm_packed(&wt_packed, dy_img, px, px, dx_img, px, Init::Zero);
                return;
            }
            dx_img.fill(0.0);
            for p0 in (0..px).step_by(tile_px) {
                let p1 = px.min(p0 + tile_px);
                let t = p1 - p0;
                gemm_packed(&wt_packed, &dy_img[p0..], px, t, &mut dcol[..k * t], t, Init::Zero);
                col2im_tile_add(g, &mut dcol[..k * t], p0, p1, dx_img);
            }
        },
    );
}

/// Gradients of a convolution with respect to its weight and bias, summed over the batch:
/// `dw[co, ci, i, j] = Σ_{n,oh,ow} dy[n, co, oh, ow] · x_padded[n, ci, oh·stride + i,
/// ow·stride + j]` and `db[co] = Σ_{n,oh,ow} dy[n, co, oh, ow]`.
///
/// Shapes: `x: [N, C_in, H, W]`, `dy: [N, C_out, out_h, out_w]`, `dw: [C_out, C_in, kh, kw]`
/// (overwritten), `db: [C_out]` (overwritten). On the implicit path (stride-1 same
/// convolutions) each weight is summed by one task over every image in order;
/// otherwise the batch is cut into chunks whose size depends only on `N`, chunk partials are
/// computed in parallel and added in chunk order. `db` is accumulated in f64 in a fixed order.
/// Both are bit-identical for any number of threads.
///
/// # Panics
/// If a slice length does not match the geometry, or the geometry is degenerate.
pub fn conv2d_backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32], db: Option<&mut [f32]>) {
    #[cfg(feature = "wgpu")]
    let db = {
        let mut db = db;
        if crate::gpu::conv2d_backward_weight(g, x, dy, dw, db.as_deref_mut()) {
            return;
        }
        db
    };
    if implicit::applies(g) {
        check_backward_weight(g, x, dy, dw, db.as_deref());
        if let Some(db) = db {
            bias_gradient(g, dy, db);
        }
        if g.n == 0 {
            dw.fill(0.0);
        } else if winograd::weight_applies(g) {
            winograd::backward_weight(g, x, dy, dw);
        } else {
            implicit::backward_weight(g, x, dy, dw);
        }
        return;
    }
    backward_weight_tiled(g, x, dy, dw, db, g.tile_px(), MAX_WEIGHT_PARTIALS);
}

/// Panics unless the slices have the lengths the geometry gives them.
fn check_backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &[f32], db: Option<&[f32]>) {
    g.validate("conv2d_backward_weight");
    assert_eq!(
        x.len(),
        g.x_len(),
        "conv2d_backward_weight: x has {} elements, geometry {g:?} needs [N, C_in, H, W]",
        x.len()
    );
    assert_eq!(
        dy.len(),
        g.y_len(),
        "conv2d_backward_weight: dy has {} elements, geometry {g:?} needs [N, C_out, out_h, out_w]",
        dy.len()
    );
    assert_eq!(
        dw.len(),
        g.w_len(),
        "conv2d_backward_weight: dw has {} elements, geometry {g:?} needs [C_out, C_in, kh, kw]",
        dw.len()
    );
    if let Some(db) = db {
        assert_eq!(
            db.len(),
            g.c_out,
            "conv2d_backward_weight: db has {} elements, C_out is {}",
            db.len(),
            g.c_out
        );
    }
}

/// `db[co] = Σ_{n,p} dy[n, co, p]`, summed in f64 image after image (8 lanes within an image).
fn bias_gradient(g: &Conv2dGeom, dy: &[f32], db: &mut [f32]) {
    let px = g.out_px();
    let y_img_len = g.c_out * px;
    db.par_iter_mut().enumerate().for_each(|(co, db_co)| {
        let mut acc = 0.0f64;
        for n in 0..g.n {
            let start = n * y_img_len + co * px;
            acc += sum_f64_lanes(&dy[start..start + px], |v| v as f64);
        }
        *db_co = acc as f32;
    });
}

fn backward_weight_tiled(
    g: &Conv2dGeom,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    tile_px: usize,
    max_partials: usize,
) {
    check_backward_weight(g, x, dy, dw, db.as_deref());
    let (k, px) = (g.patch_len(), g.out_px());
    let (x_img_len, y_img_len) = (g.c_in * g.h * g.w, g.c_out * px);
    if let Some(db) = db {
        bias_gradient(g, dy, db);
    }

    if g.n == 0 {
        dw.fill(0.0);
        return;
    }
    let pointwise = g.is_pointwise();
    let chunk = g.n.div_ceil(max_partials.max(1));
    // One partial dW per chunk of images; each is summed serially, image after image.
    let partials: Vec<Vec<f32>> = x
        .par_chunks(chunk * x_img_len)
        .zip(dy.par_chunks(chunk * y_img_len))
        .map(|(x_chunk, dy_chunk)| {
            let mut acc = vec![0.0f32; g.w_len()];
            let mut col = if pointwise { Vec::new() } else { vec![0.0; k * tile_px] };
            for (x_img, dy_img) in x_chunk.chunks(x_img_len).zip(dy_chunk.chunks(y_img_len)) {
                if pointwise {
                    let x_t = MatRef::row_major(x_img, g.c_in, px).t();
                    let dy_mat = MatRef::row_major(dy_img, g.c_out, px);
                    gemm(1.0, dy_mat, x_t, 1.0, MatMut::row_major(&mut acc, g.c_out, k));
                    continue;
                }
                for p0 in (0..px).step_by(tile_px) {
                    let p1 = px.min(p0 + tile_px);
                    let t = p1 - p0;
                    im2col_tile(g, x_img, p0, p1, &mut col[..k * t]);
                    let col_t = MatRef::row_major(&col[..k * t], k, t).t();
                    let dy_tile = MatRef::new(&dy_img[p0..], g.c_out, t, px, 1);
                    gemm(1.0, dy_tile, col_t, 1.0, MatMut::row_major(&mut acc, g.c_out, k));
                }
            }
            acc
        })
        .collect();

    // Sum the partials in chunk order; every element sees the same order whatever the threads.
    const SUM_BLOCK: usize = 4096;
    dw.par_chunks_mut(SUM_BLOCK).enumerate().for_each(|(block, dw_block)| {
        let start = block * SUM_BLOCK;
        let range = start..start + dw_block.len();
        dw_block.copy_from_slice(&partials[0][range.clone()]);
        for partial in &partials[1..] {
            for (d, &p) in dw_block.iter_mut().zip(&partial[range.clone()]) {
                *d += p;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Calls `f(n, co, oh, ow, ci, i, j, x_index)` for every multiply-add of the convolution
    /// whose input element is inside the image (padding contributes nothing).
    fn for_each_tap(
        g: &Conv2dGeom,
        mut f: impl FnMut(usize, usize, usize, usize, usize, usize, usize, usize),
    ) {
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

        /// A stride-2 3x3 that halves an even image takes the polyphase route:
        /// TensorFlow's and PyTorch's paddings, images from 2x2 up, sizes across row and
        /// channel blocks.
        #[test]
        fn forward_of_halving_stride2_convolutions_matches_f64_reference(
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
}
