//! Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, arXiv:1509.09308) for the
//! stride-1 3x3 convolutions padded by 1 on every side: the U-Net's 3x3s at full resolution and
//! their input gradients, which are most of a training step's multiply-adds.
//!
//! Split the output into 2x2 tiles. Tile `(ty, tx)` reads the 4x4 window `d` of each input
//! channel that starts at row `2·ty − 1`, column `2·tx − 1` (zero outside the image), and
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A
//! ```
//!
//! with `g_c` the 3x3 kernel of input channel `c` and, for F(2, 3) along each axis,
//!
//! ```text
//! Bᵀ = | 1  0 −1  0 |    G = | 1    0    0 |    Aᵀ = | 1  1  1  0 |
//!      | 0  1  1  0 |        | ½    ½    ½ |         | 0  1 −1 −1 |
//!      | 0 −1  1  0 |        | ½   −½    ½ |
//!      | 0  1  0 −1 |        | 0    0    1 |
//! ```
//!
//! The sum over channels is, for each of the 16 places `ξ` of the 4x4 transformed tile, a matrix
//! product `M_ξ = U_ξ @ V_ξ` with `U_ξ: [C_out, C_in]` (the transformed weights) and
//! `V_ξ: [C_in, tiles]` (the transformed inputs): 16 multiply-adds per tile, channel and output
//! channel, where the direct sum takes 36 (4 pixels x 9 taps), 2.25 times fewer. The transforms
//! cost additions only (and exact halvings in `G`); they are `O(C)` per tile against the
//! products' `O(C_in·C_out)`, so they pay off from a few channels up ([`applies`]).
//!
//! The tiles are taken in chunks of whole tile rows (of one image or several; about 256 tiles,
//! so the products have long rows), one chunk per rayon task: transform the chunk's inputs, run
//! the 16 products on the packed micro-kernel (`kernels/packed.rs`), transform back and write
//! each output once, with its bias and residual added. The transforms run on the level's 16
//! lanes (`kernels/lanes/`) over the chunk's tiles laid end to end, whatever the image width:
//! the window columns of 16 tiles come from 32 consecutive values split by parity
//! ([`Lanes16::deinterleave`]), and the two output columns of 16 tiles go back the same way.
//! They only add and subtract, in one order per element, and the packed kernel sums each
//! output in one order on every level, so every level gives the same bits, whatever the number
//! of threads. The order of terms differs from the implicit path's, so the two agree to
//! rounding: the transforms add a few roundings per output, which the tests bound against an
//! f64 reference.
//!
//! `weight.rs` computes the weight gradient of the same convolutions through the same tiles
//! (where the batch has enough of them).

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::implicit::Start;
use super::Conv2dGeom;
use crate::cpu::Isa;
use crate::kernels::lanes::{Lanes16, Portable};
use crate::kernels::packed::{gemm_packed, Init, PackedA};

mod weight;

pub(super) use weight::{backward_weight, weight_applies};

/// Input and output channels from which the transforms' cost is small beside the products'.
const MIN_CHANNELS: usize = 16;

/// Weights (`C_out·C_in`) from which their transform is shared among the threads.
const PARALLEL_WEIGHTS: usize = 16 * 1024;

/// Tiles per chunk (rounded up to whole tile rows): enough columns that the products run at the
/// packed kernel's speed. Measured on the U-Net's layers (benches/README.md): 64 to 512 columns
/// are within a few percent of each other from 32 channels up, except that below 128 the
/// products of 256 channels slow down by a quarter.
const CHUNK_TILES: usize = 256;

/// Smallest image side (measured down to 7x7, where a 64-channel layer ran in 0.84 of the
/// implicit kernel's time on AVX-512, 0.95 on AVX2; at 4x4 the two take as long).
const MIN_SIDE: usize = 7;

/// Fewest tiles of a batch: below, the transforms' fixed costs outweigh the products saved (one
/// 28x28 image of 32 channels, 196 tiles, ran 1.2 times as long as the implicit kernel on AVX2).
const MIN_TILES: usize = 256;

/// Whether the geometry is a 3x3, stride-1 convolution padded by 1 on every side (so the output
/// is as large as the input) with enough channels for the transforms to pay off.
pub(super) fn applies(g: &Conv2dGeom) -> bool {
    g.stride == 1
        && (g.kh, g.kw) == (3, 3)
        && (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (1, 1, 1, 1)
        && g.c_in >= MIN_CHANNELS
        && g.c_out >= MIN_CHANNELS
        && g.h >= MIN_SIDE
        && g.w >= MIN_SIDE
        && tiles(g) >= MIN_TILES
}

/// `y[n, r, p] = start[n, r, p] + Σ_{c,t} w_at(r, c, t)·x[n, c, p + offset(t)]`, the contract
/// of the implicit forward kernel (`implicit::forward`), computed through F(2x2, 3x3): `w_at`
/// gives the 3x3 kernels (stored, or flipped and transposed for an input gradient), tap
/// `t = 3·i + j`. Every element of `y` is written. The caller has checked the lengths (the
/// bias's and residual's too) and that [`applies`] holds.
pub(super) fn forward(
    g: &Conv2dGeom,
    x: &[f32],
    w_at: impl Fn(usize, usize, usize) -> f32 + Sync,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    forward_packed(g, x, &pack(g, w_at), start, y)
}

/// The 3x3 kernels `w_at(r, c, t)` transformed and packed for [`forward_packed`]: 16 matrices
/// `U_ξ: [C_out, C_in]`. They depend on the channels only, so one packing serves every batch and
/// image size.
pub(super) fn pack(g: &Conv2dGeom, w_at: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<PackedA> {
    transform_weights(g.c_out, g.c_in, &w_at)
}

/// [`forward`] with the kernels transformed by [`pack`] for a geometry of the same channels.
pub(super) fn forward_packed(
    g: &Conv2dGeom,
    x: &[f32],
    u: &[PackedA],
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    forward_on(crate::cpu::active(), g, x, u, start, y)
}

/// The batch's 2x2 output tiles, `N·⌈h/2⌉·⌈w/2⌉`.
fn tiles(g: &Conv2dGeom) -> usize {
    g.n * g.h.div_ceil(2) * g.w.div_ceil(2)
}

/// [`forward_packed`] with the transforms on the lanes of level `isa`, which this machine must
/// run (the products run on the active level's packed kernel, which gives every level's bits).
fn forward_on(
    isa: Isa,
    g: &Conv2dGeom,
    x: &[f32],
    u: &[PackedA],
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(isa.runs_here(), "the Winograd convolution on {isa}, which this machine does not run");
    assert!(
        u.len() == 16 && u.iter().all(|a| (a.rows(), a.inner()) == (g.c_out, g.c_in)),
        "the Winograd convolution: transformed weights that are not 16 matrices [C_out, C_in]"
    );
    let plan = Plan::new(g);
    let chunks = plan.tile_rows.div_ceil(plan.rows_per_chunk);
    let rows_per_chunk = plan.rows_per_chunk;
    let tile_rows = plan.tile_rows;
    let job = Job { u, plan, x, start, out: SharedPtr(y.as_mut_ptr().cast::<f32>()) };
    (0..chunks).into_par_iter().for_each(|k| {
        let rows = k * rows_per_chunk..tile_rows.min((k + 1) * rows_per_chunk);
        SCRATCH.with_borrow_mut(|s| {
            s.fit(&job.plan);
            // SAFETY: `y` has the geometry's length (checked by the caller), the chunks' tile
            // rows, so the output rows they write, are disjoint, and `isa` is the active level.
            unsafe { chunk(isa, &job, rows, s) }
        });
    });
}

/// The tiling of one call.
struct Plan {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    /// Tile rows and columns per image: `⌈h/2⌉`, `⌈w/2⌉`.
    th: usize,
    tw: usize,
    /// Tile rows of the batch, `N·th`, and per chunk.
    tile_rows: usize,
    rows_per_chunk: usize,
    /// Columns (tiles) of a chunk's transformed matrices: `rows_per_chunk·tw`.
    ld: usize,
}

impl Plan {
    /// Length of a row buffer: the chunk's tile rows end to end, `2·tw` columns each, rounded
    /// up to whole pairs of 16-lane vectors, and room for a vector's reach past the last.
    fn row_len(&self) -> usize {
        2 * self.ld.next_multiple_of(16) + 32
    }

    /// The forward plan: chunks of about [`CHUNK_TILES`] tiles, and at least 8 chunks where the
    /// batch has that many tile rows, so the threads share the work.
    fn new(g: &Conv2dGeom) -> Self {
        Self::with_tiles(g, CHUNK_TILES, 8)
    }

    /// Chunks of about `tiles` tiles (whole tile rows), at least `min_chunks` of them where
    /// there are that many tile rows.
    fn with_tiles(g: &Conv2dGeom, tiles: usize, min_chunks: usize) -> Self {
        let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
        let tile_rows = g.n * th;
        let fit = tiles.div_ceil(tw);
        let rows_per_chunk = fit.min(tile_rows.div_ceil(min_chunks)).max(1);
        Plan {
            c_in: g.c_in,
            c_out: g.c_out,
            h: g.h,
            w: g.w,
            th,
            tw,
            tile_rows,
            rows_per_chunk,
            ld: rows_per_chunk * tw,
        }
    }
}

/// One task's buffers, kept per thread between calls (they only grow): the transformed inputs
/// `V: [16][C_in][ld]`, the products `M: [16][C_out][ld]`, and the rows of the transforms.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    /// `Bᵀ d` of the chunk's tile rows end to end, its four rows twice (`q`, `q'`; see
    /// [`transform_inputs`]), [`Plan::row_len`] each, then a row of zeros (`w`) for window rows
    /// outside the image.
    rows: Vec<f32>,
    /// The two output rows of the chunk's tile rows end to end ([`Plan::row_len`] each).
    out: Vec<f32>,
}

impl Scratch {
    /// Sizes the buffers for `p`. The kernels read only what they wrote before (the zero
    /// padding of `rows` included) or lanes whose results they do not store, so old contents do
    /// not matter.
    fn fit(&mut self, p: &Plan) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.v, 16 * p.c_in * p.ld);
        grow(&mut self.m, 16 * p.c_out * p.ld);
        grow(&mut self.rows, 8 * p.row_len() + p.w);
        grow(&mut self.out, 2 * p.row_len());
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `U_ξ = (G g Gᵀ)_ξ` for every output row `r` and channel `c`, packed as 16 matrices
/// `[rows, chans]`. `G`'s halvings are exact, so only the additions round.
fn transform_weights(
    rows: usize,
    chans: usize,
    w_at: &(impl Fn(usize, usize, usize) -> f32 + Sync),
) -> Vec<PackedA> {
    // u[r][c][ξ]; rows in parallel only where there is enough work to share.
    let mut u = vec![0.0f32; 16 * rows * chans];
    let one_row = |r: usize, ur: &mut [f32]| {
        for (c, uc) in ur.chunks_exact_mut(16).enumerate() {
            // G g: column by column of the 3x3.
            let column = |j: usize| {
                let (a, b, d) = (w_at(r, c, j), w_at(r, c, 3 + j), w_at(r, c, 6 + j));
                [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]
            };
            let cols = [column(0), column(1), column(2)];
            let gg: [[f32; 3]; 4] = std::array::from_fn(|i| [cols[0][i], cols[1][i], cols[2][i]]);
            // (G g) Gᵀ: row by row.
            for (i, [a, b, d]) in gg.into_iter().enumerate() {
                uc[4 * i..4 * i + 4].copy_from_slice(&[a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]);
            }
        }
    };
    let serial = rows * chans < PARALLEL_WEIGHTS;
    if serial {
        u.chunks_exact_mut(chans * 16).enumerate().for_each(|(r, ur)| one_row(r, ur));
    } else {
        u.par_chunks_mut(chans * 16).enumerate().for_each(|(r, ur)| one_row(r, ur));
    }
    // `u` is [r][c][ξ]: matrix ξ is the view with strides (16·chans, 16) from offset ξ.
    let pack = |xi: usize| PackedA::new(&u[xi..], rows, chans, 16 * chans, 16);
    if serial {
        (0..16).map(pack).collect()
    } else {
        (0..16).into_par_iter().map(pack).collect()
    }
}

/// One chunk: its inputs transformed, the 16 products, its outputs transformed and written, on
/// the level's lanes. The transforms only add and subtract, in one order per element, so every
/// level gives the same bits.
///
/// # Safety
/// As [`chunk_body`]; `isa` runs on this machine.
unsafe fn chunk(isa: Isa, job: &Job<'_>, rows: Range<usize>, s: &mut Scratch) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's level runs here.
        Isa::Avx512 => unsafe { x86::chunk_avx512(job, rows, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::chunk_avx2(job, rows, s) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of aarch64's baseline.
        Isa::Neon => unsafe { chunk_body::<crate::kernels::lanes::Neon>(job, rows, s) },
        // SAFETY: the portable lanes run everywhere.
        _ => unsafe { chunk_body::<Portable>(job, rows, s) },
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{chunk_body, Job, Range, Scratch};
    use crate::kernels::lanes::{Avx2, Avx512};

    /// # Safety
    /// AVX-512F present; as [`chunk_body`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chunk_avx512(job: &Job<'_>, rows: Range<usize>, s: &mut Scratch) {
        // SAFETY: as the caller's.
        unsafe { chunk_body::<Avx512>(job, rows, s) }
    }

    /// # Safety
    /// AVX2 and FMA present; as [`chunk_body`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_avx2(job: &Job<'_>, rows: Range<usize>, s: &mut Scratch) {
        // SAFETY: as the caller's.
        unsafe { chunk_body::<Avx2>(job, rows, s) }
    }
}

/// What every chunk of one call shares.
struct Job<'a> {
    plan: Plan,
    x: &'a [f32],
    u: &'a [PackedA],
    start: Start<'a>,
    out: SharedPtr,
}

/// # Safety
/// `V`'s instruction set is present; `s` fits `job.plan`; `job.out` points at
/// `y: [N, C_out, h, w]`, and no other task writes the rows of these tile rows.
#[inline(always)]
unsafe fn chunk_body<V: Lanes16>(job: &Job<'_>, rows: Range<usize>, s: &mut Scratch) {
    let p = &job.plan;
    // SAFETY: as the caller's.
    unsafe { transform_inputs::<V>(p, job.x, rows.clone(), s) };
    let cols = rows.len() * p.tw;
    for (xi, u_xi) in job.u.iter().enumerate() {
        let v = &s.v[xi * p.c_in * p.ld..][..p.c_in * p.ld];
        let m = &mut s.m[xi * p.c_out * p.ld..][..p.c_out * p.ld];
        gemm_packed(u_xi, v, p.ld, cols, m, p.ld, Init::Zero);
    }
    // SAFETY: as the caller's.
    unsafe { transform_outputs::<V>(p, rows, &job.start, s, job.out) };
}

/// The lanes below `n` (all 16 from `n ≥ 16`).
fn lanes_below(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `V_ξ[c, i·tw + tx] = (Bᵀ d B)_ξ` for the tiles of the chunk's tile rows (`i` counts them from
/// the chunk's first), `d` the 4x4 window of channel `c`.
///
/// Tile `j = i·tw + tx` reads padded columns `2tx .. 2tx + 3` of its tile row (padded column
/// `k` is input column `k − 1`). `Bᵀ d`, down the columns of the tile row's four input rows, is
/// laid out twice per row `a` of it, the chunk's tile rows end to end, `2·tw` columns each: `q`
/// from padded column 0 and `q'` from padded column 2. Then tile `j`'s window columns 0, 1 are
/// elements `2j`, `2j + 1` of `q` and columns 2, 3 those of `q'`, so `(Bᵀ d) B` runs over the
/// whole chunk 16 tiles at a time, whatever the image width.
///
/// # Safety
/// `V`'s instruction set is present; `s` fits `p`; `x` is `[N, C_in, h, w]`.
#[inline(always)]
unsafe fn transform_inputs<V: Lanes16>(p: &Plan, x: &[f32], rows: Range<usize>, s: &mut Scratch) {
    let (h, w, tw, ld) = (p.h, p.w, p.tw, p.ld);
    let span = 2 * tw;
    let cols = rows.len() * tw;
    let len = p.row_len();
    let (q, zero) = s.rows.split_at_mut(8 * len);
    let zero = &mut zero[..w];
    zero.fill(0.0);
    let qp = q.as_mut_ptr();
    // q for row a of Bᵀ d at qp + a·len, q' at qp + (4 + a)·len.
    let v = s.v.as_mut_ptr();
    let stride = p.c_in * ld;
    // Input columns 0 ..= 2tw − 2 go to q (padded columns 1 ..= 2tw − 1); 1 .. w to q'.
    let to_q = w.min(span - 1);
    for c in 0..p.c_in {
        for (i, tr) in rows.clone().enumerate() {
            let (n, ty) = (tr / p.th, tr % p.th);
            let plane = &x[(n * p.c_in + c) * h * w..][..h * w];
            // Window row `r` is input row `2·ty + r − 1`, or zeros outside the image.
            let row = |r: usize| match (2 * ty + r).checked_sub(1).filter(|&iy| iy < h) {
                Some(iy) => plane[iy * w..][..w].as_ptr(),
                None => zero.as_ptr(),
            };
            let d = [row(0), row(1), row(2), row(3)];
            let base = i * span;
            // SAFETY: the loads read `w` elements of each input row; the stores write elements
            // `base .. base + span` of each `q` row (`len ≥ 2·cols`, `fit`): q's lane `k` goes to
            // `base + k + 1` (k < 2tw − 1), q''s lane `k` to `base + k − 1` (k ≥ 1), and the
            // zero padding fills the rest.
            unsafe {
                for k0 in (0..w).step_by(16) {
                    let m = lanes_below(w - k0);
                    let [d0, d1, d2, d3] = d.map(|r| V::load_masked(m, r.add(k0)));
                    let bt = [d0.sub(d2), d1.add(d2), d2.sub(d1), d1.sub(d3)];
                    let (mq, mq2) = (lanes_below(to_q.saturating_sub(k0)), if k0 == 0 { m & !1 } else { m });
                    for (a, val) in bt.into_iter().enumerate() {
                        val.store_masked(mq, qp.add(a * len + base + k0 + 1));
                        val.store_masked(mq2, qp.add((4 + a) * len + base + k0).wrapping_sub(1));
                    }
                }
                for a in 0..4 {
                    *qp.add(a * len + base) = 0.0;
                    for k in w - 1..span {
                        *qp.add((4 + a) * len + base + k) = 0.0;
                    }
                }
            }
        }
        // SAFETY: the loads read `2·round16(cols) ≤ len` elements of each `q` row; the stores
        // write the chunk's `cols` tiles of each `V` row (`fit`).
        unsafe {
            for a in 0..4 {
                let (qa, qa2) = (qp.add(a * len), qp.add((4 + a) * len));
                let dst = v.add((4 * a * p.c_in + c) * ld);
                for j0 in (0..cols).step_by(16) {
                    let m = lanes_below(cols - j0);
                    let (u0, u1) = V::load(qa.add(2 * j0)).deinterleave(V::load(qa.add(2 * j0 + 16)));
                    let (u2, u3) = V::load(qa2.add(2 * j0)).deinterleave(V::load(qa2.add(2 * j0 + 16)));
                    let at = dst.add(j0);
                    u0.sub(u2).store_masked(m, at);
                    u1.add(u2).store_masked(m, at.add(stride));
                    u2.sub(u1).store_masked(m, at.add(2 * stride));
                    u1.sub(u3).store_masked(m, at.add(3 * stride));
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` for the chunk's tiles, plus what the sums start from, written to the output rows
/// `2·ty` and `2·ty + 1` (those inside the image) of every output channel: for 16 tiles at a
/// time the four outputs, interleaved into the two output rows of the chunk's tile rows laid end
/// to end (`2·tw` columns each), then each row's first `w` columns written out.
///
/// # Safety
/// `V`'s instruction set is present; `s` fits `p`; `out` points at `y: [N, C_out, h, w]`, and
/// no other task writes the rows of these tile rows.
#[inline(always)]
unsafe fn transform_outputs<V: Lanes16>(
    p: &Plan,
    rows: Range<usize>,
    start: &Start<'_>,
    s: &mut Scratch,
    out: SharedPtr,
) {
    let (h, w, tw, ld) = (p.h, p.w, p.tw, p.ld);
    let cols = rows.len() * tw;
    let len = p.row_len();
    let top = s.out.as_mut_ptr();
    let bottom = top.wrapping_add(len);
    let m = s.m.as_ptr();
    let stride = p.c_out * ld;
    for r in 0..p.c_out {
        // SAFETY: the loads read the chunk's `cols` columns of the 16 `M` rows of output
        // channel `r`; the stores write `2·round16(cols) ≤ len` elements of each row buffer.
        unsafe {
            let mr = m.add(r * ld);
            for j0 in (0..cols).step_by(16) {
                let ms: [V; 16] = if j0 + 16 <= cols {
                    std::array::from_fn(|xi| V::load(mr.add(xi * stride + j0)))
                } else {
                    let mask = lanes_below(cols - j0);
                    std::array::from_fn(|xi| V::load_masked(mask, mr.add(xi * stride + j0)))
                };
                // M A along each row (tile columns 0 and 1), then Aᵀ down the columns.
                let t0: [V; 4] = std::array::from_fn(|a| ms[4 * a].add(ms[4 * a + 1]).add(ms[4 * a + 2]));
                let t1: [V; 4] = std::array::from_fn(|a| ms[4 * a + 1].sub(ms[4 * a + 2]).sub(ms[4 * a + 3]));
                let (a0, a1) = t0[0].add(t0[1]).add(t0[2]).interleave(t1[0].add(t1[1]).add(t1[2]));
                let (b0, b1) = t0[1].sub(t0[2]).sub(t0[3]).interleave(t1[1].sub(t1[2]).sub(t1[3]));
                a0.store(top.add(2 * j0));
                a1.store(top.add(2 * j0 + 16));
                b0.store(bottom.add(2 * j0));
                b1.store(bottom.add(2 * j0 + 16));
            }
        }
        for (i, tr) in rows.clone().enumerate() {
            let (n, ty) = (tr / p.th, tr % p.th);
            let bias = start.bias.map_or(0.0, |b| b[n * start.image_stride + r]);
            for (di, buf) in [top, bottom].into_iter().enumerate() {
                let oy = 2 * ty + di;
                if oy >= h {
                    continue;
                }
                let at = ((n * p.c_out + r) * h + oy) * w;
                let res = start.residual.map(|res| res[at..at + w].as_ptr());
                // SAFETY: the loads read columns `i·2tw ..` (up to `w` rounded to 16, inside
                // `len`) of the row buffer; the row of `y` lies inside it (caller) and only this
                // task writes it.
                unsafe {
                    let row = buf.add(i * 2 * tw);
                    let dst = out.get().add(at);
                    let b = V::splat(bias);
                    for k0 in (0..w).step_by(16) {
                        let mask = lanes_below(w - k0);
                        let start = match res {
                            Some(q) => b.add(V::load_masked(mask, q.add(k0))),
                            None => b,
                        };
                        start.add(V::load(row.add(k0))).store_masked(mask, dst.add(k0));
                    }
                }
            }
        }
    }
}

/// The output pointer the tasks share; each writes its own rows only.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);

// SAFETY: the tasks that share it write disjoint rows.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    pub(super) fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    pub(super) fn same3x3(n: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Conv2dGeom {
        Conv2dGeom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_bottom: 1,
            pad_left: 1,
            pad_right: 1,
        }
    }

    /// The direct sum in f64 with what it starts from, and the sum of the terms' magnitudes
    /// (the scale of the rounding error a correct f32 computation may make).
    fn reference(g: &Conv2dGeom, x: &[f32], w: &[f32], start: &Start<'_>) -> (Vec<f64>, Vec<f64>) {
        let (h, wd) = (g.h as isize, g.w as isize);
        let mut want = vec![0.0f64; g.y_len()];
        let mut scale = vec![0.0f64; g.y_len()];
        for n in 0..g.n {
            for r in 0..g.c_out {
                for oy in 0..g.h {
                    for ox in 0..g.w {
                        let at = ((n * g.c_out + r) * g.h + oy) * g.w + ox;
                        let mut v = start.bias.map_or(0.0, |b| b[n * start.image_stride + r] as f64)
                            + start.residual.map_or(0.0, |q| q[at] as f64);
                        let mut s = v.abs();
                        for c in 0..g.c_in {
                            for t in 0..9 {
                                let (iy, ix) =
                                    (oy as isize + (t / 3) as isize - 1, ox as isize + (t % 3) as isize - 1);
                                if (0..h).contains(&iy) && (0..wd).contains(&ix) {
                                    let xv =
                                        x[((n * g.c_in + c) * g.h + iy as usize) * g.w + ix as usize] as f64;
                                    let term = w[(r * g.c_in + c) * 9 + t] as f64 * xv;
                                    v += term;
                                    s += term.abs();
                                }
                            }
                        }
                        want[at] = v;
                        scale[at] = s;
                    }
                }
            }
        }
        (want, scale)
    }

    fn run(isa: Isa, g: &Conv2dGeom, x: &[f32], w: &[f32], start: Start<'_>) -> Vec<f32> {
        let mut y = vec![f32::NAN; g.y_len()];
        let c_in = g.c_in;
        forward_on(
            isa,
            g,
            x,
            &pack(g, |r, c, t| w[(r * c_in + c) * 9 + t]),
            start,
            crate::kernels::as_uninit(&mut y),
        );
        y
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// F(2x2, 3x3) against the direct sum in f64, with and without a per-image bias and a
        /// residual, on images of odd and even sides (the last tile row and column half
        /// outside), on every level the machine runs, each giving the scalar level's bits.
        #[test]
        fn winograd_matches_the_direct_sum_on_every_level_with_the_same_bits(
            n in 1usize..=3, c_in in 16usize..=40, c_out in 16usize..=24, h in 8usize..=21, w in 8usize..=21,
            parts in 0usize..4, seed in any::<u64>(),
        ) {
            let g = same3x3(n, c_in, c_out, h, w);
            let mut rng = crate::rng_from_seed(seed);
            let x = random_vec(&mut rng, g.x_len());
            let wt = random_vec(&mut rng, g.w_len());
            let bias = random_vec(&mut rng, n * c_out);
            let residual = random_vec(&mut rng, g.y_len());
            let start = Start {
                bias: (parts & 1 != 0).then_some(&bias[..]),
                image_stride: c_out,
                residual: (parts & 2 != 0).then_some(&residual[..]),
            };
            let (want, scale) = reference(&g, &x, &wt, &start);
            let scalar = run(Isa::Scalar, &g, &x, &wt, start);
            for (k, (&got, (&v, &s))) in scalar.iter().zip(want.iter().zip(&scale)).enumerate() {
                // The transforms add a few roundings per term to the direct sum's; a wrong
                // transform or a tile in the wrong place is off by O(1).
                prop_assert!((got as f64 - v).abs() <= 2e-6 * s + 1e-9, "y[{}] = {}, want {} (scale {})", k, got, v, s);
            }
            for isa in Isa::available() {
                let y = run(isa, &g, &x, &wt, start);
                prop_assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} differs from scalar", isa);
            }
        }
    }

    #[test]
    fn applies_only_to_padded_3x3s_with_room_for_tiles() {
        // 16 images of 8x8: 256 tiles of 2x2.
        assert!(applies(&same3x3(16, 16, 16, 8, 8)));
        assert!(!applies(&same3x3(15, 16, 16, 8, 8)), "too few tiles");
        assert!(!applies(&same3x3(16, 15, 16, 8, 8)), "too few input channels");
        assert!(!applies(&same3x3(16, 16, 15, 8, 8)), "too few output channels");
        assert!(!applies(&same3x3(64, 16, 16, 6, 8)), "image too small");
        assert!(!applies(&Conv2dGeom { stride: 2, ..same3x3(16, 16, 16, 8, 8) }));
        assert!(!applies(&Conv2dGeom { pad_top: 0, pad_bottom: 2, ..same3x3(16, 16, 16, 8, 8) }));
        assert!(!weight_applies(&same3x3(127, 16, 16, 8, 8)), "too few tiles for the weight gradient");
        assert!(weight_applies(&same3x3(128, 16, 16, 8, 8)));
    }
}
