//! The patch matrix of the tiled paths, a tile of output pixels at a time: im2col (gather the
//! patches into columns) for the forward pass and the weight gradient, and col2im (scatter-add
//! the columns back) for the input gradient of the geometries that take no forward route.

use super::Conv2dGeom;

/// Output columns `ow` of one kernel column `j` whose input column lies inside the image: the
/// half-open range `lo..hi` of `ow` with `0 <= ow·stride + j − pad_left < w`, clipped to `out_w`.
pub(super) fn valid_cols(g: &Conv2dGeom, j: usize, out_w: usize) -> (usize, usize) {
    let s = g.stride;
    let lo = g.pad_left.saturating_sub(j).div_ceil(s);
    let hi = (g.w + g.pad_left).saturating_sub(j).div_ceil(s).min(out_w);
    (lo.min(hi), hi)
}

/// Visits the segments of one patch-matrix row for the output pixels `p0..p1`: for each output
/// row `oh` the tile touches, calls `f(seg_start, oh, ow_start, ow_end)`, where `seg_start` is the
/// offset of `ow_start` within the tile.
pub(super) fn for_each_row_segment(
    out_w: usize,
    p0: usize,
    p1: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let mut p = p0;
    while p < p1 {
        let (oh, ow_start) = (p / out_w, p % out_w);
        let ow_end = out_w.min(ow_start + (p1 - p));
        f(p - p0, oh, ow_start, ow_end);
        p += ow_end - ow_start;
    }
}

/// Input row read by output row `oh` at kernel row `i`, if it is inside the image.
pub(super) fn input_row(g: &Conv2dGeom, oh: usize, i: usize) -> Option<usize> {
    (oh * g.stride + i).checked_sub(g.pad_top).filter(|&ih| ih < g.h)
}

/// Writes the patch-matrix columns `p0..p1` of one image into `col: [K, p1 − p0]`.
///
/// `col[(ci·kh + i)·kw + j, p − p0] = x_padded[ci, oh·stride + i, ow·stride + j]` with
/// `(oh, ow) = (p / out_w, p % out_w)`; padding reads as zero.
pub(super) fn im2col_tile(g: &Conv2dGeom, x_img: &[f32], p0: usize, p1: usize, col: &mut [f32]) {
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
pub(super) fn im2col_tile_same_width(g: &Conv2dGeom, x_img: &[f32], p0: usize, p1: usize, col: &mut [f32]) {
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
pub(super) fn col2im_tile_add(g: &Conv2dGeom, col: &mut [f32], p0: usize, p1: usize, dx_img: &mut [f32]) {
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
pub(super) fn col2im_tile_add_same_width(
    g: &Conv2dGeom,
    col: &mut [f32],
    p0: usize,
    p1: usize,
    dx_img: &mut [f32],
) {
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
