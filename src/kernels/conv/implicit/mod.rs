//! Stride-1 "same" convolutions (the output as large as the input: every 3x3 of the U-Net but
//! the downsample, and the input gradients of those) computed without a patch matrix.
//!
//! Flatten an image's pixels, `p = oh·w + ow`. Kernel tap `(i, j)` of output pixel `p` reads
//! input element `p + (i − pad_top)·w + (j − pad_left)` of each channel plane, or zero where
//! that falls outside the image. So row `(ci, i, j)` of the im2col matrix, over a strip of 32
//! consecutive output pixels, is a shifted window of plane `ci` with some lanes zeroed; the
//! lanes to zero depend on the tap and the strip only. The kernels read those windows
//! straight from the input with masked loads (a masked-off lane is neither read nor allowed to
//! fault, and loads as 0.0), which removes im2col's writes and reads of `K·P` floats per image.
//!
//! - [`forward`]: the product `W @ col` of [`super::conv2d_forward`] (and, with the weights
//!   flipped and transposed as they are read, of the input gradient), 8 output channels x 32
//!   pixels per micro-kernel call. Where an image's pixels do not fill whole strips of 32 (14x14,
//!   7x7), the strips run over the batch's pixels end to end, and a strip that crosses from one
//!   image into the next reads and writes each image's lanes under its own mask. The inner
//!   dimension runs in blocks of whole input channels (about 288 terms, 32 channels of a 3x3:
//!   a tap's window of a channel overlaps the others', so a block's input stays in L1); inside
//!   a block tap by tap and, per tap, channel by channel, so a tap's
//!   mask and offset are loaded once per block rather than once per term. Each output is written
//!   once per block and never read before its first write, so the output buffer need not be
//!   initialised. The order of the terms is fixed by the geometry (not by threads or the
//!   instruction set), but it is not the patch-tile path's, so the two agree to rounding.
//! - [`backward_weight`]: `dW[co, ci, i, j] = Σ_n Σ_p dy[n, co, p]·x_shifted[n, ci, i, j, p]`,
//!   accumulated in 16 lanes per weight (lane `l` sums the positions `≡ l mod 16` of a block,
//!   images in order; small images are laid end to end in a block) and the lanes added in a fixed tree at the end. Each weight is owned by one task, so
//!   the result does not depend on the number of threads. The order differs from the patch-tile
//!   path's, so the two agree to rounding, not to the bit.
//!
//! Both are written once over 16 lanes (`kernels/lanes/`) and run on the lanes of the
//! `DDPM_CPU` level with its own register blocking (8 channels x 32 pixels on AVX-512, 4 x 16 on
//! AVX2 and NEON; 8 x 3 taps, 2 x 3 for the weight gradient), which changes which sums one call
//! updates but not the order of any sum: every level gives the same bits. [`applies`] says when
//! the caller may use them.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Conv2dGeom;
use crate::cpu::Isa;
use crate::kernels::packed::PackedA;

/// Taps handled (a 7x7 kernel at most).
const MAX_TAPS: usize = 49;

/// Output pixels per strip of the forward kernel: two vectors of 16.
const STRIP: usize = 32;

/// Output channels per weight-gradient item.
const ROWS: usize = 8;

/// Taps per pass of the weight-gradient kernel: 8 rows x 3 taps = 24 accumulators.
const GROUP: usize = 3;

/// Whether this geometry can take the implicit path on this machine.
pub(super) fn applies(g: &Conv2dGeom) -> bool {
    g.stride == 1
        && g.kh * g.kw > 1
        && g.kh * g.kw <= MAX_TAPS
        && g.out_h() == g.h
        && g.out_w() == g.w
        // A 16-lane half strip spans at most two images.
        && g.h * g.w >= 16
}

/// The taps of a stride-1 same convolution: for tap `t = i·kw + j`, the row and column shift
/// `(i − pad_top, j − pad_left)` and the flat offset `shift_row·w + shift_col`.
struct Taps {
    rows: Vec<isize>,
    cols: Vec<isize>,
    offsets: Vec<isize>,
    h: isize,
    w: isize,
}

impl Taps {
    fn new(g: &Conv2dGeom) -> Self {
        let (mut rows, mut cols, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..g.kh {
            for j in 0..g.kw {
                let (di, dj) = (i as isize - g.pad_top as isize, j as isize - g.pad_left as isize);
                rows.push(di);
                cols.push(dj);
                offsets.push(di * g.w as isize + dj);
            }
        }
        Self { rows, cols, offsets, h: g.h as isize, w: g.w as isize }
    }

    fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether pixel `p` reads an input element inside the image through tap `t`.
    fn reads_inside(&self, p: usize, t: usize) -> bool {
        self.inside((p as isize) / self.w, (p as isize) % self.w, t)
    }

    /// Whether output pixel `(oh, ow)` reads an input element inside the image through tap `t`.
    fn inside(&self, oh: isize, ow: isize, t: usize) -> bool {
        (0..self.h).contains(&(oh + self.rows[t])) && (0..self.w).contains(&(ow + self.cols[t]))
    }
}

/// What [`forward`]'s sums start from: `bias[n·image_stride + r]` (0 without a bias; a stride
/// of 0 gives every image the same bias) plus `residual[n, r, p]` (laid out as `y`) if given.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Start<'a> {
    pub bias: Option<&'a [f32]>,
    pub image_stride: usize,
    pub residual: Option<&'a [f32]>,
}

/// `y[n, r, p] = start[n, r, p] + Σ_{c,t} w_at(r, c, t)·x[n, c, p + offset(t)]` for every image:
/// the product `W @ col` with `W[r, c·taps + t] = w_at(r, c, t)` (the stored weights, or for an
/// input gradient the flipped, transposed ones, read in place). Every element of `y` is written.
/// The caller has checked the lengths (the bias's and residual's too) and that [`applies`]
/// holds.
pub(super) fn forward(
    g: &Conv2dGeom,
    x: &[f32],
    w_at: impl Fn(usize, usize, usize) -> f32 + Sync,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    forward_packed(g, x, &pack(g, w_at), start, y)
}

/// `W[r, c·taps + t] = w_at(r, c, t)` packed in the kernel's order of terms: channel blocks,
/// within a block tap by tap, within a tap channel by channel. It depends on the geometry's
/// channels and taps only, so one packing serves every batch and image size.
pub(super) fn pack(g: &Conv2dGeom, w_at: impl Fn(usize, usize, usize) -> f32 + Sync) -> PackedA {
    let t_n = g.kh * g.kw;
    let cb = channels_per_block(t_n);
    let mut order = Vec::with_capacity(g.c_in * t_n);
    for c0 in (0..g.c_in).step_by(cb) {
        for t in 0..t_n {
            order.extend((c0..g.c_in.min(c0 + cb)).map(|c| (c, t)));
        }
    }
    PackedA::from_fn(g.c_out, order.len(), |r, kk| {
        let (c, t) = order[kk];
        w_at(r, c, t)
    })
}

/// [`forward`] with the weights packed by [`pack`] for a geometry of the same channels and taps.
pub(super) fn forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    w: &PackedA,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    forward_on(crate::cpu::active(), g, x, w, start, y)
}

/// [`forward_packed`] on the kernels of level `isa`, which this machine must run.
fn forward_on(
    isa: Isa,
    g: &Conv2dGeom,
    x: &[f32],
    w: &PackedA,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(isa.runs_here(), "the implicit convolution on {isa}, which this machine does not run");
    assert!(
        (w.rows(), w.inner()) == (g.c_out, g.c_in * g.kh * g.kw),
        "the implicit convolution: weights packed as {}x{}, the geometry needs {}x{}",
        w.rows(),
        w.inner(),
        g.c_out,
        g.c_in * g.kh * g.kw
    );
    let taps = Taps::new(g);
    let px = g.h * g.w;
    // Strips of 32 output pixels. Where an image's last strip would leave many lanes idle (a
    // 14x14 image fills 196 of 224, a 7x7 49 of 64), the batch's pixels run end to end and a
    // strip (or one of its 16-lane halves) may start in one image and end in the next; else
    // each image starts a strip. Tasks take runs of whole strips; each output is written by one
    // task, in an order fixed by the geometry.
    let padded = px.div_ceil(STRIP) * STRIP;
    let span = if px * 100 < padded * 95 { px } else { padded };
    let total = g.n * px;
    let flat = Flat { px, span, c_in: g.c_in, c_out: g.c_out, total };
    let strips = (g.n * span).div_ceil(STRIP);
    let per_task = strips.div_ceil(64).max(1);
    let table = MaskTable::new(&taps, &flat);
    let (xp, yp) = (SharedPtr(x.as_ptr().cast_mut()), SharedPtr(y.as_mut_ptr().cast::<f32>()));
    let rp = SharedPtr(start.residual.map_or(std::ptr::null_mut(), |r| r.as_ptr().cast_mut()));
    (0..strips.div_ceil(per_task)).into_par_iter().for_each(|k| {
        let strips = k * per_task..strips.min((k + 1) * per_task);
        // SAFETY: `x` and `y` have the geometry's lengths (checked by the caller), and the
        // tasks' runs of strips, so the outputs they write, are disjoint.
        unsafe {
            dispatch::forward_strips(
                isa,
                w,
                &taps,
                &table,
                &flat,
                xp.get(),
                yp.get(),
                rp.get(),
                strips,
                &start,
            )
        }
    });
}

/// A pointer the forward tasks share; each writes its own elements only.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);

// SAFETY: the tasks that share it read (input) or write disjoint elements (output).
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// How [`forward`] lays the batch out in strips. Pixel `p` of image `n` is pixel
/// `n·span + p` of the strips, with `span` either `px` (images end to end) or `px` rounded up
/// to whole strips (each image starts a strip; the lanes past its end are off). Its flat index
/// `f = n·px + p` gives its element in channel `c` of an `[N, C, px]` tensor:
/// `n·C·px + c·px + p = f + n·(C − 1)·px + c·px`.
struct Flat {
    px: usize,
    span: usize,
    c_in: usize,
    c_out: usize,
    total: usize,
}

/// The lanes of one 16-pixel half strip: those of the image that holds its first pixel ("a")
/// and those of the next image ("b"), each for every tap (the lanes that read inside their
/// image) and for the store (the lanes that exist).
#[derive(Clone, Copy)]
struct HalfMasks {
    /// The image holding the first pixel.
    image: usize,
    /// The first pixel's flat index `f` (see [`Flat`]).
    start: usize,
    a: [u16; MAX_TAPS],
    b: [u16; MAX_TAPS],
    store_a: u16,
    store_b: u16,
}

impl HalfMasks {
    /// The masks of a half strip whose first pixel is pixel `q0` of its image, as if the batch
    /// did not end; the lanes past the image belong to the next one if `spill`, else are off.
    /// The caller ensures `px ≥ 16`, so 16 lanes span at most two images.
    fn at_phase(taps: &Taps, px: usize, q0: usize, spill: bool) -> Self {
        let mut m =
            HalfMasks { image: 0, start: 0, a: [0; MAX_TAPS], b: [0; MAX_TAPS], store_a: 0, store_b: 0 };
        for l in 0..16 {
            if !spill && q0 + l >= px {
                break;
            }
            let (q, second) = if q0 + l < px { (q0 + l, false) } else { (q0 + l - px, true) };
            let (taps_mask, store) =
                if second { (&mut m.b, &mut m.store_b) } else { (&mut m.a, &mut m.store_a) };
            *store |= 1 << l;
            let (oh, ow) = ((q as isize) / taps.w, (q as isize) % taps.w);
            for (t, bits) in taps_mask[..taps.len()].iter_mut().enumerate() {
                if taps.inside(oh, ow, t) {
                    *bits |= 1 << l;
                }
            }
        }
        m
    }

    /// Switches off the lanes from `lanes` on (past the batch's last pixel).
    fn keep_first(&mut self, lanes: usize) {
        let keep = if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 };
        for bits in self.a.iter_mut().chain(self.b.iter_mut()) {
            *bits &= keep;
        }
        self.store_a &= keep;
        self.store_b &= keep;
    }
}

/// The [`HalfMasks`] of every half strip: a half strip starts at a multiple of 16 of the
/// strips, so its first pixel's place in its image is a multiple of `gcd(span, 16)`; one entry
/// per such place.
struct MaskTable {
    step: usize,
    phases: Vec<HalfMasks>,
}

impl MaskTable {
    fn new(taps: &Taps, flat: &Flat) -> Self {
        let step = gcd(flat.span, 16);
        let spill = flat.span == flat.px;
        let phases =
            (0..flat.span).step_by(step).map(|q0| HalfMasks::at_phase(taps, flat.px, q0, spill)).collect();
        Self { step, phases }
    }

    /// The masks of the half strip at pixel `s0` of the strips.
    fn half(&self, flat: &Flat, s0: usize) -> HalfMasks {
        let (image, q0) = (s0 / flat.span, s0 % flat.span);
        let mut m = self.phases[q0 / self.step];
        m.image = image;
        m.start = image * flat.px + q0;
        if m.start + 16 > flat.total {
            m.keep_first(flat.total.saturating_sub(m.start));
        }
        m
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `dW` (overwritten) of every weight; the bias gradient is the caller's.
/// The caller has checked the lengths and that [`applies`] holds.
pub(super) fn backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    backward_weight_on(crate::cpu::active(), g, x, dy, dw)
}

/// [`backward_weight`] on the kernels of level `isa`, which this machine must run.
fn backward_weight_on(isa: Isa, g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(isa.runs_here(), "the implicit weight gradient on {isa}, which this machine does not run");
    let taps = Taps::new(g);
    let t_n = taps.len();
    let px = g.h * g.w;
    let padded_taps = t_n.div_ceil(GROUP) * GROUP;
    // Images per pass over the accumulators, laid end to end (pixel `f` of the block is pixel
    // `f mod px` of image `f / px`): enough pixels (about 1024) that loading and storing the
    // accumulators is small next to the sums and that small images fill whole 16-lane chunks,
    // few enough that a panel of dy stays in L1.
    let image_block = (1024 / px).clamp(1, g.n.max(1));
    // Per 16-lane chunk of a block and tap (padded to whole groups of taps with empty masks):
    // the lanes whose pixel is in the block and reads an input element of its own image.
    let mask_table = |images: usize| {
        let len = images * px;
        let mut table = vec![0u16; len.div_ceil(16) * padded_taps];
        for f in 0..len {
            for t in 0..t_n {
                if taps.reads_inside(f % px, t) {
                    table[f / 16 * padded_taps + t] |= 1 << (f % 16);
                }
            }
        }
        table
    };
    // Images end to end only where the last chunk of an image would leave many lanes idle (a
    // 7x7 image fills 49 of 64); otherwise each image keeps its own chunks, read in place.
    let flatten = image_block > 1 && !px.is_multiple_of(16) && px * 10 < px.div_ceil(16) * 16 * 9;
    let (full_masks, last_masks) = if flatten {
        (mask_table(image_block), mask_table(g.n % image_block))
    } else {
        (mask_table(1), Vec::new())
    };
    // Work items: a panel of 8 output channels times a range of input channels; enough of them
    // to keep every core busy, a count that depends on the shapes only.
    let panels = g.c_out.div_ceil(ROWS);
    let splits = 16usize.div_ceil(panels).clamp(1, g.c_in);
    let per_item = g.c_in.div_ceil(splits);
    let items: Vec<(usize, usize, usize)> = (0..panels)
        .flat_map(|q| (0..g.c_in).step_by(per_item).map(move |c0| (q, c0, (c0 + per_item).min(g.c_in))))
        .collect();
    let geometry = WeightGeom { n: g.n, c_in: g.c_in, c_out: g.c_out, px, t_n, image_block, flatten };
    let results: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(q, c0, c1)| {
            // SAFETY: `x` and `dy` have the geometry's lengths (checked by the caller).
            unsafe {
                dispatch::weight_item(
                    isa,
                    &geometry,
                    x,
                    dy,
                    &taps.offsets,
                    [&full_masks, &last_masks],
                    q,
                    c0,
                    c1,
                )
            }
        })
        .collect();
    for (&(q, c0, c1), sums) in items.iter().zip(&results) {
        let span = (c1 - c0) * t_n;
        for r in 0..ROWS.min(g.c_out - q * ROWS) {
            let co = q * ROWS + r;
            let start = (co * g.c_in + c0) * t_n;
            dw[start..start + span].copy_from_slice(&sums[r * span..(r + 1) * span]);
        }
    }
}

/// Input channels per inner-dimension block of the forward kernel: about 288 terms in whole
/// channels. (128, as in `packed.rs`, measured 3-10% slower at the 14x14 and 7x7 shapes: the 9
/// taps of a channel read overlapping windows, so a block's input is far smaller than its
/// term count suggests.)
fn channels_per_block(t_n: usize) -> usize {
    (288 / t_n).max(1)
}

/// Sizes the weight-gradient items share.
struct WeightGeom {
    n: usize,
    c_in: usize,
    c_out: usize,
    px: usize,
    t_n: usize,
    image_block: usize,
    /// Whether a block's images are laid end to end in one run of chunks.
    flatten: bool,
}

/// The kernels on the lanes of a level, each with its register blocking; every level sums each
/// output's terms in the same order.
mod dispatch {
    use std::ops::Range;

    use super::{lanes, Flat, MaskTable, Start, Taps, WeightGeom};
    use crate::cpu::Isa;
    use crate::kernels::lanes::Portable;
    use crate::kernels::packed::PackedA;

    /// [`lanes::forward_strips`] on level `isa`'s lanes.
    ///
    /// # Safety
    /// As [`lanes::forward_strips`]; the machine runs `isa`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward_strips(
        isa: Isa,
        w: &PackedA,
        taps: &Taps,
        table: &MaskTable,
        flat: &Flat,
        x: *const f32,
        y: *mut f32,
        residual: *const f32,
        strips: Range<usize>,
        start: &Start<'_>,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::forward_avx512(w, taps, table, flat, x, y, residual, strips, start),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::forward_avx2(w, taps, table, flat, x, y, residual, strips, start),
            // 8 output channels x 8 pixels (two quarters): 16 of NEON's 32 registers accumulate.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => lanes::forward_strips::<crate::kernels::lanes::NeonQuarter, 8, 2, 16>(
                w, taps, table, flat, x, y, residual, strips, start,
            ),
            _ => lanes::forward_strips::<Portable, 8, 2, 16>(
                w, taps, table, flat, x, y, residual, strips, start,
            ),
        }
    }

    /// [`lanes::weight_item`] on level `isa`'s lanes.
    ///
    /// # Safety
    /// As [`lanes::weight_item`]; the machine runs `isa`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weight_item(
        isa: Isa,
        g: &WeightGeom,
        x: &[f32],
        dy: &[f32],
        offsets: &[isize],
        masks: [&[u16]; 2],
        q: usize,
        c0: usize,
        c1: usize,
    ) -> Vec<f32> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::weight_avx512(g, x, dy, offsets, masks, q, c0, c1),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::weight_avx2(g, x, dy, offsets, masks, q, c0, c1),
            // 8 rows x 3 taps, four lanes at a time: 24 of NEON's 32 registers accumulate.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => lanes::weight_item::<crate::kernels::lanes::NeonQuarter, 8, 24>(
                g, x, dy, offsets, masks, q, c0, c1,
            ),
            _ => lanes::weight_item::<Portable, 8, 24>(g, x, dy, offsets, masks, q, c0, c1),
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::ops::Range;

        use super::super::{lanes, Flat, MaskTable, Start, Taps, WeightGeom};
        use crate::kernels::lanes::{Avx2Half, Avx512};
        use crate::kernels::packed::PackedA;

        /// 8 output channels x 32 pixels per call: 16 accumulators of the 32 registers.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn forward_avx512(
            w: &PackedA,
            taps: &Taps,
            table: &MaskTable,
            flat: &Flat,
            x: *const f32,
            y: *mut f32,
            residual: *const f32,
            strips: Range<usize>,
            start: &Start<'_>,
        ) {
            lanes::forward_strips::<Avx512, 8, 2, 16>(w, taps, table, flat, x, y, residual, strips, start)
        }

        /// 8 output channels x 8 pixels per call: 8 of the 16 AVX2 registers accumulate, and
        /// each load of the input feeds 8 multiply-adds (4 with 4 x 16, which left the
        /// 32x32 and 16x16 images, whose channel planes are 4 KiB apart and share L1 sets,
        /// waiting on L2).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn forward_avx2(
            w: &PackedA,
            taps: &Taps,
            table: &MaskTable,
            flat: &Flat,
            x: *const f32,
            y: *mut f32,
            residual: *const f32,
            strips: Range<usize>,
            start: &Start<'_>,
        ) {
            lanes::forward_strips::<Avx2Half, 8, 1, 8>(w, taps, table, flat, x, y, residual, strips, start)
        }

        /// All 8 rows x 3 taps per pass: 24 accumulators.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn weight_avx512(
            g: &WeightGeom,
            x: &[f32],
            dy: &[f32],
            offsets: &[isize],
            masks: [&[u16]; 2],
            q: usize,
            c0: usize,
            c1: usize,
        ) -> Vec<f32> {
            lanes::weight_item::<Avx512, 8, 24>(g, x, dy, offsets, masks, q, c0, c1)
        }

        /// 4 rows x 3 taps per pass, lanes 0..8 then 8..16: 12 of the 16 AVX2 registers
        /// accumulate.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn weight_avx2(
            g: &WeightGeom,
            x: &[f32],
            dy: &[f32],
            offsets: &[isize],
            masks: [&[u16]; 2],
            q: usize,
            c0: usize,
            c1: usize,
        ) -> Vec<f32> {
            lanes::weight_item::<Avx2Half, 4, 12>(g, x, dy, offsets, masks, q, c0, c1)
        }
    }
}

/// The kernels, written once over 16 lanes (`kernels/lanes`).
mod lanes;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    /// A stride-1 same geometry the implicit kernels take: odd sizes (partial strips, images
    /// laid end to end, strips crossing images), up to 5x5 kernels, uneven padding.
    fn same() -> impl Strategy<Value = Conv2dGeom> {
        (1usize..=3, 1usize..=3)
            .prop_flat_map(|(kh, kw)| {
                (
                    (1usize..=3, 1usize..=20, 1usize..=19),
                    (4usize..=15, 4usize..=15),
                    (Just((kh, kw)), 0..kh, 0..kw),
                )
            })
            .prop_map(|((n, c_in, c_out), (h, w), ((kh, kw), top, left))| Conv2dGeom {
                n,
                c_in,
                h,
                w,
                c_out,
                kh: 2 * kh - 1,
                kw: 2 * kw - 1,
                stride: 1,
                pad_top: top,
                pad_bottom: 2 * kh - 2 - top,
                pad_left: left,
                pad_right: 2 * kw - 2 - left,
            })
            .prop_filter("the implicit kernels apply", applies)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Every level this machine runs gives the portable lanes' bits, forward (with a bias
        /// per image and a residual) and for the weight gradient: one order of sums everywhere.
        #[test]
        fn every_level_gives_the_same_bits(g in same(), with_residual in any::<bool>(), seed in any::<u64>()) {
            let mut rng = crate::rng_from_seed(seed);
            let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
            let (x, w, dy) = (rand(g.x_len()), rand(g.w_len()), rand(g.y_len()));
            let (bias, residual) = (rand(g.n * g.c_out), rand(g.y_len()));
            let taps = g.kh * g.kw;
            let start = Start { bias: Some(&bias), image_stride: g.c_out, residual: with_residual.then_some(&residual[..]) };
            let run = |isa: Isa| {
                let mut y = vec![MaybeUninit::new(f32::NAN); g.y_len()];
                forward_on(isa, &g, &x, &pack(&g, |r, c, t| w[(r * g.c_in + c) * taps + t]), start, &mut y);
                // SAFETY: `forward_on` writes every element (and they started initialised).
                let y: Vec<u32> = y.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect();
                let mut dw = vec![f32::NAN; g.w_len()];
                backward_weight_on(isa, &g, &x, &dy, &mut dw);
                (y, dw.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
            };
            let want = run(Isa::Scalar);
            for isa in Isa::available() {
                let got = run(isa);
                prop_assert!(got.0 == want.0, "forward on {} differs from scalar ({:?})", isa, g);
                prop_assert!(got.1 == want.1, "weight gradient on {} differs from scalar ({:?})", isa, g);
            }
        }
    }
}
