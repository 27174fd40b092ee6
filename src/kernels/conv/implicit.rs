//! Stride-1 "same" convolutions (the output as large as the input: every 3x3 of the U-Net but
//! the downsample, and the input gradients of those) computed without a patch matrix.
//!
//! Flatten an image's pixels, `p = oh·w + ow`. Kernel tap `(i, j)` of output pixel `p` reads
//! input element `p + (i − pad_top)·w + (j − pad_left)` of each channel plane, or zero where
//! that falls outside the image. So row `(ci, i, j)` of the im2col matrix, over a strip of 32
//! consecutive output pixels, is a shifted window of plane `ci` with some lanes zeroed; the
//! lanes to zero depend on the tap and the strip only. The AVX-512 kernels read those windows
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
//!   initialised. The order of the terms is fixed by the geometry (not by threads), but it is
//!   not the patch-tile path's, so the two agree to rounding.
//! - [`backward_weight`]: `dW[co, ci, i, j] = Σ_n Σ_p dy[n, co, p]·x_shifted[n, ci, i, j, p]`,
//!   accumulated in 16 lanes per weight (lane `l` sums the positions `≡ l mod 16` of a block,
//!   images in order; small images are laid end to end in a block) and the lanes added in a fixed tree at the end. Each weight is owned by one task, so
//!   the result does not depend on the number of threads. The order differs from the patch-tile
//!   path's, so the two agree to rounding, not to the bit.
//!
//! Both need AVX-512F; [`applies`] says when the caller may use them.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Conv2dGeom;
use crate::kernels::packed::{self, PackedA};

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
    packed::available()
        && g.stride == 1
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `applies` checked AVX-512F; `x` and `y` have the geometry's lengths (checked
        // by the caller), and the tasks' runs of strips, so the outputs they write, are disjoint.
        unsafe {
            avx512::forward_strips(w, &taps, &table, &flat, xp.get(), yp.get(), rp.get(), strips, &start)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "the implicit convolution needs AVX-512F ({:?}, {:?}, {})",
            start,
            strips,
            (xp.get(), yp.get(), rp.get(), flat.px).3
        )
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
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512F; `x` and `dy` have the geometry's lengths.
            unsafe {
                avx512::weight_item(&geometry, x, dy, &taps.offsets, [&full_masks, &last_masks], q, c0, c1)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("the implicit convolution needs AVX-512F ({q}, {c0}, {c1}, {})", geometry.px)
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use std::ops::Range;

    use super::{Flat, HalfMasks, MaskTable, Start, Taps, WeightGeom, GROUP, ROWS, STRIP};
    use crate::kernels::packed::{PackedA, MR};

    /// Strips `strips` of the batch laid end to end (see [`Flat`]), every output channel.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` is `[N, C_in, px]`, `y` `[N, C_out, px]` (written, every
    /// element of these strips, before it is read: the first block of channels stores the sums,
    /// later blocks add to them), `w` packed `[C_out, C_in·taps]`; `residual` is null or, when
    /// `start` has one, its `[N, C_out, px]` values; `start`'s bias has an entry for every
    /// image and row it indexes; no other thread touches the outputs of these strips.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_strips(
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
                    if split {
                        strip_kernel::<true>(&block, panel, out, res, live, r0);
                    } else {
                        strip_kernel::<false>(&block, panel, out, res, live, r0);
                    }
                }
            }
        }
    }

    /// Asks for strip `s`'s residual (`[N, C_out, px]`) to be brought into cache while the
    /// strip before it is computed: its first block of channels loads the residual of every
    /// output channel, one cache line or two per channel `px` floats apart, which the hardware
    /// does not prefetch by itself, and the micro-kernel would wait on each.
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_residual(flat: &Flat, residual: *const f32, s: usize) {
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
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(15).cast());
                if spills {
                    // The next image's lanes start at its pixel 0.
                    _mm_prefetch::<_MM_HINT_T0>(
                        residual.wrapping_add(plane0 + (flat.c_out + r) * flat.px).cast(),
                    );
                }
            }
        }
    }

    /// What the 8 x 32 blocks of one strip and one block of input channels share.
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

    /// One 8 x 32 output block over a block of input channels of `t_n` taps each: the
    /// micro-kernel of `packed.rs` with `B`'s row `(c, t)` read, per half strip, at
    /// `x + c·x_plane + offsets[t]` under the first image's mask and, if `SPLIT`, `next_in`
    /// further on under the second image's; the outputs (and `res`, the residual at the same
    /// places) likewise. `SPLIT` is whether any half strip has lanes in a second image.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn strip_kernel<const SPLIT: bool>(
        b: &Block<'_>,
        panel: *const f32,
        out: [*mut f32; 2],
        res: [*const f32; 2],
        live: usize,
        r0: usize,
    ) {
        let [h0, h1] = b.loads;
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        for r in 0..MR {
            if r >= live {
                continue;
            }
            for (h, [first, second]) in b.stores.into_iter().enumerate() {
                let o = out[h].wrapping_add(r * b.y_plane);
                acc[2 * r + h] = match b.start {
                    None => {
                        let v = _mm512_maskz_loadu_ps(first, o);
                        if SPLIT {
                            _mm512_mask_loadu_ps(v, second, o.wrapping_add(b.next_out))
                        } else {
                            v
                        }
                    }
                    Some(s) => {
                        let (row, image) = (r0 + r, b.images[h]);
                        // A half wholly past the batch has no lanes and reads no bias.
                        let mut v = match s.bias {
                            Some(bias) if first != 0 => {
                                let v = _mm512_set1_ps(*bias.get_unchecked(image * s.image_stride + row));
                                if SPLIT && second != 0 {
                                    let next = *bias.get_unchecked((image + 1) * s.image_stride + row);
                                    _mm512_mask_blend_ps(second, v, _mm512_set1_ps(next))
                                } else {
                                    v
                                }
                            }
                            _ => _mm512_setzero_ps(),
                        };
                        if s.residual.is_some() {
                            let p = res[h].wrapping_add(r * b.y_plane);
                            let mut rv = _mm512_maskz_loadu_ps(first, p);
                            if SPLIT {
                                rv = _mm512_mask_loadu_ps(rv, second, p.wrapping_add(b.next_out));
                            }
                            v = _mm512_add_ps(v, rv);
                        }
                        v
                    }
                };
            }
        }
        let mut wp = panel;
        for t in 0..b.t_n {
            // Lanes whose element is outside their image (or past the batch) are masked off:
            // not read, and loaded as 0.0, the zero im2col would have written.
            let (a0, a1) = (*h0.a.get_unchecked(t), *h1.a.get_unchecked(t));
            let (b0, b1) = (*h0.b.get_unchecked(t), *h1.b.get_unchecked(t));
            let offset = *b.offsets.add(t);
            let mut src = [b.x[0].wrapping_offset(offset), b.x[1].wrapping_offset(offset)];
            for _ in 0..b.channels {
                let mut v0 = _mm512_maskz_loadu_ps(a0, src[0]);
                let mut v1 = _mm512_maskz_loadu_ps(a1, src[1]);
                if SPLIT {
                    v0 = _mm512_mask_loadu_ps(v0, b0, src[0].wrapping_add(b.next_in));
                    v1 = _mm512_mask_loadu_ps(v1, b1, src[1].wrapping_add(b.next_in));
                }
                for r in 0..MR {
                    let wr = _mm512_set1_ps(*wp.add(r));
                    acc[2 * r] = _mm512_fmadd_ps(wr, v0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(wr, v1, acc[2 * r + 1]);
                }
                wp = wp.add(MR);
                src = [src[0].wrapping_add(b.x_plane), src[1].wrapping_add(b.x_plane)];
            }
        }
        for r in 0..MR {
            if r >= live {
                continue;
            }
            for (h, [first, second]) in b.stores.into_iter().enumerate() {
                let o = out[h].wrapping_add(r * b.y_plane);
                _mm512_mask_storeu_ps(o, first, acc[2 * r + h]);
                if SPLIT {
                    _mm512_mask_storeu_ps(o.wrapping_add(b.next_out), second, acc[2 * r + h]);
                }
            }
        }
    }

    /// The weight gradient of output channels `8q..8q+8` (those that exist) and input channels
    /// `c0..c1`, as `[row][c − c0][tap]`.
    ///
    /// # Safety
    /// AVX-512F must be available; `x: [N, C_in, px]`, `dy: [N, C_out, px]`; `masks` as built
    /// by `backward_weight` (`[chunk][tap]`, taps padded to whole groups): with `g.flatten`, for
    /// a full block of images end to end and for the last, shorter one; without, for one image.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_item(
        g: &WeightGeom,
        x: &[f32],
        dy: &[f32],
        offsets: &[isize],
        masks: [&[u16]; 2],
        q: usize,
        c0: usize,
        c1: usize,
    ) -> Vec<f32> {
        let (px, t_n) = (g.px, g.t_n);
        debug_assert!(x.len() == g.n * g.c_in * px && dy.len() == g.n * g.c_out * px);
        let groups = t_n.div_ceil(GROUP);
        let padded_taps = groups * GROUP;
        let live = ROWS.min(g.c_out - q * ROWS);
        let cc = c1 - c0;
        // The 24 accumulators of each (channel, tap group), kept between blocks.
        let mut acc_buf = vec![_mm512_setzero_ps(); cc * groups * ROWS * GROUP];
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
                    let slot = &mut acc_buf[(c * groups + gi) * ROWS * GROUP..][..ROWS * GROUP];
                    let mut acc = [_mm512_setzero_ps(); ROWS * GROUP];
                    acc.copy_from_slice(slot);
                    let mut d = dy_panel.as_ptr();
                    for seg in 0..segments {
                        let xp = if g.flatten {
                            x_block.as_ptr().add(c * seg_len)
                        } else {
                            x.as_ptr().add(((n0 + seg) * g.c_in + c0 + c) * px)
                        };
                        // This group's taps; a missing one has an empty mask and offset 0.
                        let mut xs_ptr = [xp; GROUP];
                        for (k, ptr) in xs_ptr.iter_mut().enumerate() {
                            if let Some(&o) = offsets.get(gi * GROUP + k) {
                                *ptr = xp.wrapping_offset(o);
                            }
                        }
                        let mut m = table.as_ptr().add(gi * GROUP);
                        for ch in 0..seg_chunks {
                            let p = ch * 16;
                            let mut xs = [_mm512_setzero_ps(); GROUP];
                            for k in 0..GROUP {
                                // Lanes past the segment or reading outside their image are off.
                                xs[k] = _mm512_maskz_loadu_ps(*m.add(k), xs_ptr[k].wrapping_add(p));
                            }
                            for r in 0..ROWS {
                                let dv = _mm512_loadu_ps(d.add(r * 16));
                                for k in 0..GROUP {
                                    acc[r * GROUP + k] = _mm512_fmadd_ps(dv, xs[k], acc[r * GROUP + k]);
                                }
                            }
                            d = d.add(ROWS * 16);
                            // One past the table after the last chunk: never read.
                            m = m.wrapping_add(padded_taps);
                        }
                    }
                    slot.copy_from_slice(&acc);
                }
            }
        }
        // Each weight's 16 lanes, added in a fixed tree.
        let mut out = vec![0.0f32; ROWS * cc * t_n];
        for r in 0..ROWS {
            for c in 0..cc {
                for t in 0..t_n {
                    let (gi, k) = (t / GROUP, t % GROUP);
                    let v = acc_buf[(c * groups + gi) * ROWS * GROUP + r * GROUP + k];
                    let mut lanes = [0.0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), v);
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
