//! The implicit convolution's kernels, written once over 16 lanes (`kernels/lanes`) and
//! instantiated per level by `dispatch` in the parent module: the forward strips (also the
//! input gradient and the polyphase and upsample forms) and the weight gradient.

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
                let mut lanes = [0.0f32; 16];
                lanes.copy_from_slice(&acc_buf[at..at + 16]);
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
