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
//! Both are written once over 16 lanes (`kernels/lanes.rs`) and run on the lanes of the
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
    forward_on(crate::cpu::active(), g, x, w_at, start, y)
}

/// [`forward`] on the kernels of level `isa`, which this machine must run.
fn forward_on(
    isa: Isa,
    g: &Conv2dGeom,
    x: &[f32],
    w_at: impl Fn(usize, usize, usize) -> f32 + Sync,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(isa.runs_here(), "the implicit convolution on {isa}, which this machine does not run");
    let taps = Taps::new(g);
    let px = g.h * g.w;
    let t_n = taps.len();
    // The weights packed in the kernel's order of terms: channel blocks, within a block tap by
    // tap, within a tap channel by channel.
    let cb = channels_per_block(t_n);
    let mut order = Vec::with_capacity(g.c_in * t_n);
    for c0 in (0..g.c_in).step_by(cb) {
        for t in 0..t_n {
            order.extend((c0..g.c_in.min(c0 + cb)).map(|c| (c, t)));
        }
    }
    let w = &PackedA::from_fn(g.c_out, order.len(), |r, kk| {
        let (c, t) = order[kk];
        w_at(r, c, t)
    });
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

/// The kernels, written once over 16 lanes ([`crate::kernels::lanes`]).
mod lanes {
    use std::ops::Range;

    use super::{Flat, HalfMasks, MaskTable, Start, Taps, WeightGeom, GROUP, ROWS, STRIP};
    use crate::kernels::lanes::{prefetch, Part};
    use crate::kernels::packed::{PackedA, MR};

    /// Strips `strips` of the batch laid end to end (see [`Flat`]), every output channel, `R`
    /// output channels by `S` slots of `P::LANES` pixels per micro-kernel call (`N = R·S`
    /// accumulators; a strip's 32 pixels are `32 / P::LANES` slots).
    ///
    /// # Safety
    /// `V`'s instruction set present; `x` is `[N, C_in, px]`, `y` `[N, C_out, px]` (written,
    /// every element of these strips, before it is read: the first block of channels stores the
    /// sums, later blocks add to them), `w` packed `[C_out, C_in·taps]`; `residual` is null or,
    /// when `start` has one, its `[N, C_out, px]` values; `start`'s bias has an entry for every
    /// image and row it indexes; no other thread touches the outputs of these strips.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn forward_strips<P: Part, const R: usize, const S: usize, const N: usize>(
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
        debug_assert!(R * S == N && MR.is_multiple_of(R) && (STRIP / P::LANES).is_multiple_of(S));
        let t_n = taps.len();
        let (rows, inner, px) = (w.rows, w.inner, flat.px);
        debug_assert_eq!(inner, flat.c_in * t_n);
        let channels_per_block = super::channels_per_block(t_n);
        // From an image's element to the next image's at the same place (see `Flat`).
        let (next_in, next_out) = ((flat.c_in - 1) * px, (flat.c_out - 1) * px);
        for s in strips.clone() {
            if !residual.is_null() && s + 1 < strips.end {
                prefetch_residual(flat, residual, s + 1);
            }
            let f0 = s * STRIP;
            let halves = [table.half(flat, f0), table.half(flat, f0 + 16)];
            // Element (image of the half's first pixel, channel 0, that pixel) of `x` and `y`;
            // past the end for a half wholly past the batch, whose masks are empty.
            let at = |h: usize, next: usize| halves[h].start + halves[h].image * next;
            let ys = [y.wrapping_add(at(0, next_out)), y.wrapping_add(at(1, next_out))];
            let rs = [residual.wrapping_add(at(0, next_out)), residual.wrapping_add(at(1, next_out))];
            let split = halves.iter().any(|h| h.store_b != 0);
            let xs = [x.wrapping_add(at(0, next_in)), x.wrapping_add(at(1, next_in))];
            for c0 in (0..flat.c_in).step_by(channels_per_block) {
                let block = Block {
                    channels: channels_per_block.min(flat.c_in - c0),
                    t_n,
                    x: [xs[0].wrapping_add(c0 * px), xs[1].wrapping_add(c0 * px)],
                    next_in,
                    x_plane: px,
                    offsets: taps.offsets.as_ptr(),
                    loads: &halves,
                    stores: [[halves[0].store_a, halves[0].store_b], [halves[1].store_a, halves[1].store_b]],
                    next_out,
                    y_plane: px,
                    start: (c0 == 0).then_some(start),
                    images: [halves[0].image, halves[1].image],
                };
                for q in 0..rows.div_ceil(MR) {
                    let r0 = q * MR;
                    let panel = w.data.as_ptr().add((q * inner + c0 * t_n) * MR);
                    let out = [ys[0].wrapping_add(r0 * px), ys[1].wrapping_add(r0 * px)];
                    let res = [rs[0].wrapping_add(r0 * px), rs[1].wrapping_add(r0 * px)];
                    let live = MR.min(rows - r0);
                    for rr in (0..live).step_by(R) {
                        for slot in (0..STRIP / P::LANES).step_by(S) {
                            let empty = (slot..slot + S).all(|k| {
                                let (half, off) = slot_place::<P>(k);
                                (block.stores[half][0] | block.stores[half][1]) >> off & lane_bits::<P>() == 0
                            });
                            if empty {
                                // Pixels past the batch's end: nothing to compute.
                                continue;
                            }
                            let call = Pass { panel, out, res, live, r0, rr, slot };
                            if split {
                                strip_kernel::<P, R, S, N, true>(&block, &call);
                            } else {
                                strip_kernel::<P, R, S, N, false>(&block, &call);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Asks for strip `s`'s residual (`[N, C_out, px]`) to be brought into cache while the
    /// strip before it is computed: its first block of channels loads the residual of every
    /// output channel, one cache line or two per channel `px` floats apart, which the hardware
    /// does not prefetch by itself, and the micro-kernel would wait on each.
    #[inline(always)]
    fn prefetch_residual(flat: &Flat, residual: *const f32, s: usize) {
        for h in 0..2 {
            let f = s * STRIP + 16 * h;
            let (image, q0) = (f / flat.span, f % flat.span);
            if image >= flat.total / flat.px || q0 >= flat.px {
                continue;
            }
            let plane0 = image * flat.c_out * flat.px;
            let spills = q0 + 16 > flat.px && image + 1 < flat.total / flat.px;
            for r in 0..flat.c_out {
                let p = residual.wrapping_add(plane0 + r * flat.px + q0);
                prefetch(p);
                prefetch(p.wrapping_add(15));
                if spills {
                    // The next image's lanes start at its pixel 0.
                    prefetch(residual.wrapping_add(plane0 + (flat.c_out + r) * flat.px));
                }
            }
        }
    }

    /// What the blocks of one strip and one block of input channels share.
    struct Block<'a> {
        channels: usize,
        t_n: usize,
        /// Per half strip: `x` at the first channel of the block.
        x: [*const f32; 2],
        next_in: usize,
        x_plane: usize,
        offsets: *const isize,
        /// Per half strip, the lanes each tap reads.
        loads: &'a [HalfMasks; 2],
        /// Per half strip, the lanes of its first and second image.
        stores: [[u16; 2]; 2],
        next_out: usize,
        y_plane: usize,
        /// For the first block of channels, what the sums start from; later blocks add to
        /// the stored sums.
        start: Option<&'a Start<'a>>,
        /// Per half strip, the image of its first pixel.
        images: [usize; 2],
    }

    /// One micro-kernel call's place: the panel's 8 rows (`live` of them real) at `r0`, of
    /// which rows `rr..rr+R` and slots `slot..slot+S` are computed; `out` and `res` (the
    /// residual at the same places) per half strip at row `r0`.
    struct Pass {
        panel: *const f32,
        out: [*mut f32; 2],
        res: [*const f32; 2],
        live: usize,
        r0: usize,
        rr: usize,
        slot: usize,
    }

    /// Slot `k`'s half strip and its first lane there.
    #[inline(always)]
    fn slot_place<P: Part>(k: usize) -> (usize, usize) {
        (k * P::LANES / 16, k * P::LANES % 16)
    }

    /// The mask bits of one part's lanes.
    #[inline(always)]
    fn lane_bits<P: Part>() -> u16 {
        if P::LANES >= 16 {
            u16::MAX
        } else {
            (1u16 << P::LANES) - 1
        }
    }

    /// One R x (S·LANES) output block over a block of input channels of `t_n` taps each: the
    /// micro-kernel of `packed.rs` with `B`'s row `(c, t)` read, per slot, at
    /// `x + c·x_plane + offsets[t]` under the first image's mask and, if `SPLIT`, `next_in`
    /// further on under the second image's; the outputs (and the residual) likewise. `SPLIT`
    /// is whether any half strip has lanes in a second image.
    #[inline(always)]
    unsafe fn strip_kernel<P: Part, const R: usize, const S: usize, const N: usize, const SPLIT: bool>(
        b: &Block<'_>,
        p: &Pass,
    ) {
        // Per slot: its half strip, first lane there, and store masks shifted to lane 0.
        let mut half = [0usize; S];
        let mut off = [0usize; S];
        let mut stores = [[0u16; 2]; S];
        for k in 0..S {
            (half[k], off[k]) = slot_place::<P>(p.slot + k);
            let [first, second] = b.stores[half[k]];
            stores[k] = [first >> off[k] & lane_bits::<P>(), second >> off[k] & lane_bits::<P>()];
        }
        let mut acc = [P::zero(); N];
        for r in 0..R {
            let row = p.rr + r;
            if row >= p.live {
                continue;
            }
            for k in 0..S {
                let [first, second] = stores[k];
                let o = p.out[half[k]].wrapping_add(row * b.y_plane + off[k]);
                acc[r * S + k] = match b.start {
                    None => {
                        let v = P::load_masked(first, o);
                        if SPLIT {
                            v.merge_under(P::mask(second), o.wrapping_add(b.next_out))
                        } else {
                            v
                        }
                    }
                    Some(st) => {
                        let (channel, image) = (p.r0 + row, b.images[half[k]]);
                        // A slot with no lanes in the batch reads no bias.
                        let mut v = match st.bias {
                            Some(bias) if first != 0 => {
                                let v = P::splat(*bias.get_unchecked(image * st.image_stride + channel));
                                if SPLIT && second != 0 {
                                    let next = *bias.get_unchecked((image + 1) * st.image_stride + channel);
                                    v.blend(second, P::splat(next))
                                } else {
                                    v
                                }
                            }
                            Some(bias) if SPLIT && second != 0 => {
                                // The slot's lanes are all in the next image.
                                P::splat(*bias.get_unchecked((image + 1) * st.image_stride + channel))
                            }
                            _ => P::zero(),
                        };
                        if st.residual.is_some() {
                            let q = p.res[half[k]].wrapping_add(row * b.y_plane + off[k]);
                            let mut rv = P::load_masked(first, q);
                            if SPLIT {
                                rv = rv.merge_under(P::mask(second), q.wrapping_add(b.next_out));
                            }
                            v = v.add(rv);
                        }
                        v
                    }
                };
            }
        }
        let mut wp = p.panel.add(p.rr);
        for t in 0..b.t_n {
            // Lanes whose element is outside their image (or past the batch) are masked off:
            // not read, and loaded as 0.0, the zero im2col would have written.
            let mut first = [0u16; S];
            let mut second = [0u16; S];
            let offset = *b.offsets.add(t);
            let mut src = [std::ptr::null::<f32>(); S];
            for k in 0..S {
                let masks = &b.loads[half[k]];
                first[k] = *masks.a.get_unchecked(t) >> off[k] & lane_bits::<P>();
                second[k] = *masks.b.get_unchecked(t) >> off[k] & lane_bits::<P>();
                src[k] = b.x[half[k]].wrapping_offset(offset).wrapping_add(off[k]);
            }
            // Most taps of most strips read every lane inside one image: plain loads there.
            let whole = first.iter().all(|&m| m == lane_bits::<P>()) && second.iter().all(|&m| m == 0);
            if whole {
                wp = channel_terms::<P, R, S, N, false, false>(b, &mut acc, wp, src, first, second);
            } else {
                wp = channel_terms::<P, R, S, N, true, SPLIT>(b, &mut acc, wp, src, first, second);
            }
        }
        for r in 0..R {
            let row = p.rr + r;
            if row >= p.live {
                continue;
            }
            for k in 0..S {
                let [first, second] = stores[k];
                let o = p.out[half[k]].wrapping_add(row * b.y_plane + off[k]);
                acc[r * S + k].store_masked(first, o);
                if SPLIT {
                    acc[r * S + k].store_masked(second, o.wrapping_add(b.next_out));
                }
            }
        }
    }

    /// One tap's terms over the block's channels: per channel, the `S` slots' windows
    /// (with `MASKED`, under `first`, and with `SPLIT` also `second` `next_in` further on;
    /// without, whole vectors, where the caller has checked that `first` selects every lane)
    /// times the `R` rows' weights. Returns the panel pointer after the block's channels.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn channel_terms<
        P: Part,
        const R: usize,
        const S: usize,
        const N: usize,
        const MASKED: bool,
        const SPLIT: bool,
    >(
        b: &Block<'_>,
        acc: &mut [P; N],
        mut wp: *const f32,
        mut src: [*const f32; S],
        first: [u16; S],
        second: [u16; S],
    ) -> *const f32 {
        // The masks in the form the loads take, once for all the channels.
        let (mut m1, mut m2) = ([P::mask(0); S], [P::mask(0); S]);
        if MASKED {
            for k in 0..S {
                m1[k] = P::mask(first[k]);
                m2[k] = P::mask(second[k]);
            }
        }
        for _ in 0..b.channels {
            let mut v = [P::zero(); S];
            for k in 0..S {
                v[k] = if !MASKED {
                    P::load(src[k])
                } else if SPLIT {
                    P::load_under(m1[k], src[k]).merge_under(m2[k], src[k].wrapping_add(b.next_in))
                } else {
                    P::load_under(m1[k], src[k])
                };
            }
            for r in 0..R {
                let wr = P::splat(*wp.add(r));
                for k in 0..S {
                    acc[r * S + k] = acc[r * S + k].fmadd(wr, v[k]);
                }
            }
            wp = wp.add(MR);
            for s in &mut src {
                *s = s.wrapping_add(b.x_plane);
            }
        }
        wp
    }

    /// The weight gradient of output channels `8q..8q+8` (those that exist) and input channels
    /// `c0..c1`, as `[row][c − c0][tap]`; `RP` rows x 3 taps per pass over the pixels
    /// (`A = 3·RP` accumulators of `P::LANES` lanes), and each part of the 16 lanes in turn.
    /// Lane `l` of a weight's accumulator sums, in order, its terms at the pixels `≡ l mod 16`
    /// of each chunk; the passes and parts only change which lanes one sweep updates, not any
    /// lane's order of terms.
    ///
    /// # Safety
    /// `V`'s instruction set present; `x: [N, C_in, px]`, `dy: [N, C_out, px]`; `masks` as
    /// built by `backward_weight` (`[chunk][tap]`, taps padded to whole groups): with
    /// `g.flatten`, for a full block of images end to end and for the last, shorter one;
    /// without, for one image.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn weight_item<P: Part, const RP: usize, const A: usize>(
        g: &WeightGeom,
        x: &[f32],
        dy: &[f32],
        offsets: &[isize],
        masks: [&[u16]; 2],
        q: usize,
        c0: usize,
        c1: usize,
    ) -> Vec<f32> {
        debug_assert!(RP * GROUP == A && ROWS.is_multiple_of(RP));
        let (px, t_n) = (g.px, g.t_n);
        debug_assert!(x.len() == g.n * g.c_in * px && dy.len() == g.n * g.c_out * px);
        let groups = t_n.div_ceil(GROUP);
        let padded_taps = groups * GROUP;
        let live = ROWS.min(g.c_out - q * ROWS);
        let cc = c1 - c0;
        // The 24 accumulators of each (channel, tap group), 16 lanes each, kept between blocks.
        let mut acc_buf = vec![0.0f32; cc * groups * ROWS * GROUP * 16];
        let block_len = g.image_block * px;
        // dy of this panel for a block, `[segment][chunk][row][16]` (a segment is the whole
        // block when flattened, else one image), zero past each segment's last pixel and in rows
        // past the last channel: one pointer reads all 8 rows.
        let panel_len = if g.flatten { block_len.div_ceil(16) } else { g.image_block * px.div_ceil(16) };
        let mut dy_panel = vec![0.0f32; panel_len * ROWS * 16];
        // Flattened: this item's input channels for the block, images end to end.
        let mut x_block = if g.flatten { vec![0.0f32; cc * block_len] } else { Vec::new() };
        for n0 in (0..g.n).step_by(g.image_block) {
            let n1 = g.n.min(n0 + g.image_block);
            let (segments, seg_len) = if g.flatten { (1, (n1 - n0) * px) } else { (n1 - n0, px) };
            let seg_chunks = seg_len.div_ceil(16);
            let table = if !g.flatten || n1 - n0 == g.image_block { masks[0] } else { masks[1] };
            debug_assert_eq!(table.len(), seg_chunks * padded_taps);
            dy_panel[..segments * seg_chunks * ROWS * 16].fill(0.0);
            for r in 0..live {
                for n in n0..n1 {
                    let row = &dy[(n * g.c_out + q * ROWS + r) * px..][..px];
                    let (seg, base) = if g.flatten { (0, (n - n0) * px) } else { (n - n0, 0) };
                    let mut p = 0;
                    while p < px {
                        let f = base + p;
                        let take = (16 - f % 16).min(px - p);
                        let at = ((seg * seg_chunks + f / 16) * ROWS + r) * 16 + f % 16;
                        dy_panel[at..at + take].copy_from_slice(&row[p..p + take]);
                        p += take;
                    }
                }
            }
            if g.flatten {
                for c in 0..cc {
                    for n in n0..n1 {
                        x_block[c * seg_len + (n - n0) * px..][..px]
                            .copy_from_slice(&x[(n * g.c_in + c0 + c) * px..][..px]);
                    }
                }
            }
            for c in 0..cc {
                for gi in 0..groups {
                    let slot = acc_buf.as_mut_ptr().add((c * groups + gi) * ROWS * GROUP * 16);
                    for part in (0..16).step_by(P::LANES) {
                        for r0 in (0..live).step_by(RP) {
                            // Accumulator (r, k) of the slot, lanes part..part+LANES.
                            let at = |r: usize, k: usize| slot.add(((r0 + r) * GROUP + k) * 16 + part);
                            let mut acc = [P::zero(); A];
                            for r in 0..RP {
                                for k in 0..GROUP {
                                    acc[r * GROUP + k] = P::load(at(r, k));
                                }
                            }
                            let mut d = dy_panel.as_ptr().add(r0 * 16 + part);
                            for seg in 0..segments {
                                let xp = if g.flatten {
                                    x_block.as_ptr().add(c * seg_len)
                                } else {
                                    x.as_ptr().add(((n0 + seg) * g.c_in + c0 + c) * px)
                                };
                                // This group's taps; a missing one has an empty mask and offset 0.
                                let mut xs_ptr = [xp.wrapping_add(part); GROUP];
                                for (k, ptr) in xs_ptr.iter_mut().enumerate() {
                                    if let Some(&o) = offsets.get(gi * GROUP + k) {
                                        *ptr = xp.wrapping_offset(o).wrapping_add(part);
                                    }
                                }
                                let mut m = table.as_ptr().add(gi * GROUP);
                                for ch in 0..seg_chunks {
                                    let p = ch * 16;
                                    let mut xs = [P::zero(); GROUP];
                                    for k in 0..GROUP {
                                        // Lanes past the segment or reading outside their
                                        // image are off.
                                        xs[k] = P::load_masked(*m.add(k) >> part, xs_ptr[k].wrapping_add(p));
                                    }
                                    for r in 0..RP {
                                        let dv = P::load(d.add(r * 16));
                                        for k in 0..GROUP {
                                            acc[r * GROUP + k] = acc[r * GROUP + k].fmadd(dv, xs[k]);
                                        }
                                    }
                                    d = d.add(ROWS * 16);
                                    // One past the table after the last chunk: never read.
                                    m = m.wrapping_add(padded_taps);
                                }
                            }
                            for r in 0..RP {
                                for k in 0..GROUP {
                                    acc[r * GROUP + k].store(at(r, k));
                                }
                            }
                        }
                    }
                }
            }
        }
        // Each weight's 16 lanes, added in a fixed tree.
        let mut out = vec![0.0f32; ROWS * cc * t_n];
        for r in 0..ROWS {
            for c in 0..cc {
                for t in 0..t_n {
                    let (gi, k) = (t / GROUP, t % GROUP);
                    let at = ((c * groups + gi) * ROWS * GROUP + r * GROUP + k) * 16;
                    let mut lanes: [f32; 16] = acc_buf[at..at + 16].try_into().expect("16 lanes");
                    let mut width = 16;
                    while width > 1 {
                        width /= 2;
                        for l in 0..width {
                            lanes[l] += lanes[l + width];
                        }
                    }
                    out[(r * cc + c) * t_n + t] = lanes[0];
                }
            }
        }
        out
    }
}

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
                forward_on(isa, &g, &x, |r, c, t| w[(r * g.c_in + c) * taps + t], start, &mut y);
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
