//! The gradients of a convolution: with respect to its input (as a forward convolution of `dy`
//! with the flipped, transposed weights where the stride is 1, else patch tiles and col2im) and
//! with respect to its weight and bias (the implicit kernel, Winograd, or patch tiles and the
//! general gemm).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::im2col::{col2im_tile_add, im2col_tile};
use super::{
    forward_any, implicit, same_conv, winograd, zero_init, Conv2dGeom, ConvPlus, MAX_WEIGHT_PARTIALS,
};
use crate::kernels::as_uninit;
use crate::kernels::gemm::{gemm, MatMut, MatRef};
use crate::kernels::math::sum_f64_lanes;
use crate::kernels::packed::{gemm_packed, Init, PackedA};

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
pub(super) fn as_forward(g: &Conv2dGeom) -> Option<Conv2dGeom> {
    (g.stride == 1 && !g.is_pointwise()).then(|| g.transposed()).flatten()
}

/// The input gradient of a stride-1 convolution as a forward convolution: `dx` is the full
/// correlation of `dy` with the weights flipped in both spatial axes and with `C_in`/`C_out`
/// swapped, `w'[ci, co, i, j] = w[co, ci, kh−1−i, kw−1−j]`, padded by `k − 1 − pad` on each side
/// (`g'` from [`Conv2dGeom::transposed`]). This runs on the forward path (patch tiles and the
/// packed micro-kernel, each output written once) instead of a product followed by a col2im
/// scatter-add that reads and writes `dx` once per kernel tap.
pub(super) fn backward_input_as_forward(
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

pub(super) fn backward_input_tiled(g: &Conv2dGeom, dy: &[f32], w: &[f32], dx: &mut [f32], tile_px: usize) {
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
pub(super) fn check_backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &[f32], db: Option<&[f32]>) {
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
pub(super) fn bias_gradient(g: &Conv2dGeom, dy: &[f32], db: &mut [f32]) {
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

pub(super) fn backward_weight_tiled(
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
