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
//! The tiles are taken in chunks of whole tile rows (of one image or several), few enough that a
//! chunk's transformed inputs and products stay in the L2 cache, one chunk per rayon task:
//! transform the chunk's inputs, run the 16 products on the packed micro-kernel
//! (`kernels/packed.rs`), transform back and write each output once, with its bias and
//! residual added. The transforms are plain loops over the tiles of a row (which the compiler
//! vectorises; additions in a fixed order per element), and the packed kernel sums each output
//! in one order on every level, so every level gives the same bits, whatever the number of
//! threads. The order of terms differs from the implicit path's, so the two agree to rounding:
//! the transforms add a few roundings per output, which the tests bound against an f64
//! reference.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::implicit::Start;
use super::Conv2dGeom;
use crate::cpu::Isa;
use crate::kernels::lanes::{Lanes16, Part, Portable};
use crate::kernels::packed::{gemm_packed, Init, PackedA};

/// Input and output channels from which the transforms' cost is small beside the products'.
const MIN_CHANNELS: usize = 16;

/// Weights (`C_out·C_in`) from which their transform is shared among the threads.
const PARALLEL_WEIGHTS: usize = 16 * 1024;

/// Tiles per chunk (rounded up to whole tile rows): enough columns that the products run at the
/// packed kernel's speed. Measured on the U-Net's layers (benches/README.md): 64 to 512 columns
/// are within a few percent of each other from 32 channels up, except that below 128 the
/// products of 256 channels slow down by a quarter.
const CHUNK_TILES: usize = 256;

/// Smallest image side: below 8, a tile row has too few tiles to fill the transforms' lanes (a
/// 7x7 image's 64-channel layer ran 1.2-1.4 times slower than the implicit kernel).
const MIN_SIDE: usize = 8;

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
    forward_on(crate::cpu::active(), g, x, w_at, start, y)
}

/// [`forward`] with the transforms on the lanes of level `isa`, which this machine must run
/// (the products run on the active level's packed kernel, which gives every level's bits).
fn forward_on(
    isa: Isa,
    g: &Conv2dGeom,
    x: &[f32],
    w_at: impl Fn(usize, usize, usize) -> f32 + Sync,
    start: Start<'_>,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(isa.runs_here(), "the Winograd convolution on {isa}, which this machine does not run");
    let plan = Plan::new(g);
    let chunks = plan.tile_rows.div_ceil(plan.rows_per_chunk);
    let rows_per_chunk = plan.rows_per_chunk;
    let tile_rows = plan.tile_rows;
    let job = Job {
        u: transform_weights(g.c_out, g.c_in, &w_at),
        plan,
        x,
        start,
        out: SharedPtr(y.as_mut_ptr().cast::<f32>()),
    };
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

/// `dW[r, c, t] = Σ_{n,p} dy[n, r, p]·x[n, c, p + offset(t)]` (overwritten), the weight gradient
/// of the convolution [`forward`] computes, through the same tiles: with `Y = Aᵀ (U ⊙ V) A` and
/// `U = G g Gᵀ`,
///
/// ```text
/// dU_ξ[r, c] = Σ_tiles (A dY Aᵀ)_ξ[r, tile] · V_ξ[c, tile],    dW[r, c] = Gᵀ dU[r, c] G,
/// ```
///
/// 16 multiply-adds per tile, channel and output channel against the direct sum's 36. The tiles
/// are summed in chunks (as in [`forward`]); chunks are grouped into at most [`PARTS`] parts by
/// their count alone, each part sums its chunks in order into its own `dU`, and the parts are
/// added in order: the result does not depend on the number of threads. Within a chunk each
/// `dU_ξ[r, c]` is summed in 16 lanes (lane `l` over the chunk's tiles `≡ l mod 16`), added in a
/// fixed tree, on every level. The caller has checked the lengths and that [`applies`] holds.
pub(super) fn backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    backward_weight_on(crate::cpu::active(), g, x, dy, dw)
}

/// Most parts a weight gradient's tiles are split into (one task each).
const PARTS: usize = 8;

/// Tiles per chunk of the weight gradient: each `dU_ξ[r, c]` is added up from its 16 lanes once
/// per chunk, which costs about as much as 256 tiles' multiply-adds.
const WEIGHT_CHUNK_TILES: usize = 1024;

/// Tiles of a batch from which the weight gradient takes F(2x2, 3x3): with fewer, the chunks'
/// lane sums cost more than the multiply-adds saved (16x256x8x8 with 256 channels, 256 tiles,
/// ran twice as long as the implicit kernel; 16x256x16x16, 1,024 tiles, as long).
pub(super) const WEIGHT_MIN_TILES: usize = 2048;

/// Whether [`backward_weight`] is the faster route for this geometry (beyond [`applies`]).
pub(super) fn weight_applies(g: &Conv2dGeom) -> bool {
    applies(g) && g.n * g.h.div_ceil(2) * g.w.div_ceil(2) >= WEIGHT_MIN_TILES
}

/// [`backward_weight`] on the lanes of level `isa`, which this machine must run.
fn backward_weight_on(isa: Isa, g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(isa.runs_here(), "the Winograd weight gradient on {isa}, which this machine does not run");
    // Each chunk's sums leave their 16 lanes once: chunks long enough that this is small.
    let plan = Plan::with_tiles(g, WEIGHT_CHUNK_TILES, PARTS);
    let chunks = plan.tile_rows.div_ceil(plan.rows_per_chunk);
    let per_part = chunks.div_ceil(PARTS).max(1);
    let (k_n, c_n) = (g.c_out, g.c_in);
    let partials: Vec<Vec<f32>> = (0..chunks.div_ceil(per_part))
        .into_par_iter()
        .map(|part| {
            let mut du = vec![0.0f32; 16 * k_n * c_n];
            SCRATCH.with_borrow_mut(|s| {
                s.fit(&plan);
                for k in part * per_part..chunks.min((part + 1) * per_part) {
                    let rows = k * plan.rows_per_chunk..plan.tile_rows.min((k + 1) * plan.rows_per_chunk);
                    // SAFETY: `x` and `dy` have the geometry's lengths (checked by the caller),
                    // `s` fits the plan, and `isa` runs here.
                    unsafe { weight_chunk(isa, &plan, x, dy, rows, s, &mut du) };
                }
            });
            du
        })
        .collect();
    let mut du = partials.first().cloned().unwrap_or_else(|| vec![0.0; 16 * k_n * c_n]);
    for part in partials.iter().skip(1) {
        for (a, &b) in du.iter_mut().zip(part) {
            *a += b;
        }
    }
    // Gᵀ dU G for every weight: Gᵀ's rows take u0 + ½(u1 + u2), ½(u1 − u2), ½(u1 + u2) + u3.
    let reduce = |u: [f32; 4]| {
        let (sum, diff) = (0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]));
        [u[0] + sum, diff, sum + u[3]]
    };
    for r in 0..k_n {
        for c in 0..c_n {
            let at = |xi: usize| du[(xi * k_n + r) * c_n + c];
            let rows: [[f32; 3]; 4] = std::array::from_fn(|a| reduce(std::array::from_fn(|b| at(4 * a + b))));
            let out = &mut dw[(r * c_n + c) * 9..][..9];
            for j in 0..3 {
                let [i0, i1, i2] = reduce(std::array::from_fn(|a| rows[a][j]));
                (out[j], out[3 + j], out[6 + j]) = (i0, i1, i2);
            }
        }
    }
}

/// One chunk of [`backward_weight`]: its inputs transformed (`V`), its output gradients
/// transformed (`A dY Aᵀ`, into the scratch's `M`), and their products summed into `du`
/// (`[16][C_out][C_in]`), on the level's lanes.
///
/// # Safety
/// `x: [N, C_in, h, w]`, `dy: [N, C_out, h, w]`; `s` fits `p`; `isa` runs here.
unsafe fn weight_chunk(
    isa: Isa,
    p: &Plan,
    x: &[f32],
    dy: &[f32],
    rows: Range<usize>,
    s: &mut Scratch,
    du: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's level runs here.
        Isa::Avx512 => unsafe { x86::weight_avx512(p, x, dy, rows, s, du) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::weight_avx2(p, x, dy, rows, s, du) },
        // 8 rows x 3 channels of four lanes: 24 of NEON's 32 registers accumulate.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of aarch64's baseline.
        Isa::Neon => unsafe {
            weight_body::<crate::kernels::lanes::Neon, crate::kernels::lanes::NeonQuarter, 8, 24>(
                p, x, dy, rows, s, du,
            )
        },
        // SAFETY: the portable lanes run everywhere.
        _ => unsafe { weight_body::<Portable, Portable, 8, 24>(p, x, dy, rows, s, du) },
    }
}

/// The body of [`weight_chunk`]: transforms on `V`, sums on parts `P` of the 16 lanes, `RP`
/// output channels x 3 input channels per pass (`A = 3·RP` accumulators).
///
/// # Safety
/// As [`weight_chunk`]; `V`'s and `P`'s instruction sets present.
#[inline(always)]
unsafe fn weight_body<V: Lanes16, P: Part, const RP: usize, const A: usize>(
    p: &Plan,
    x: &[f32],
    dy: &[f32],
    rows: Range<usize>,
    s: &mut Scratch,
    du: &mut [f32],
) {
    debug_assert!(A == 3 * RP);
    // SAFETY: as the caller's.
    unsafe {
        transform_inputs::<V>(p, x, rows.clone(), s);
        transform_grads::<V>(p, dy, rows.clone(), s);
    }
    let (k_n, c_n, ld) = (p.c_out, p.c_in, p.ld);
    let cols = rows.len() * p.tw;
    let (vp, mp) = (s.v.as_ptr(), s.m.as_ptr());
    let mut lanes = [[0.0f32; 16]; A];
    for xi in 0..16 {
        for k0 in (0..k_n).step_by(RP) {
            // Rows past the last are read as the last one and their sums dropped.
            let dm: [*const f32; RP] =
                std::array::from_fn(|r| mp.wrapping_add((xi * k_n + (k0 + r).min(k_n - 1)) * ld));
            for c0 in (0..c_n).step_by(3) {
                let vr: [*const f32; 3] =
                    std::array::from_fn(|c| vp.wrapping_add((xi * c_n + (c0 + c).min(c_n - 1)) * ld));
                for part in (0..16).step_by(P::LANES) {
                    let mut acc = [P::zero(); A];
                    for j0 in (0..cols).step_by(16) {
                        // Tiles past the chunk's last load as 0.
                        let m = lanes_below(cols - j0) >> part;
                        // SAFETY: the lanes loaded lie in the chunk's columns of rows of `M`
                        // and `V` (`fit`).
                        unsafe {
                            let xs: [P; 3] = std::array::from_fn(|c| P::load_masked(m, vr[c].add(j0 + part)));
                            for r in 0..RP {
                                let d = P::load_masked(m, dm[r].add(j0 + part));
                                for c in 0..3 {
                                    acc[r * 3 + c] = acc[r * 3 + c].fmadd(d, xs[c]);
                                }
                            }
                        }
                    }
                    for (a, lane) in acc.iter().zip(lanes.iter_mut()) {
                        // SAFETY: a part's lanes lie inside the 16.
                        unsafe { a.store(lane.as_mut_ptr().add(part)) };
                    }
                }
                for r in 0..RP.min(k_n - k0) {
                    for c in 0..3.min(c_n - c0) {
                        du[(xi * k_n + k0 + r) * c_n + c0 + c] += tree_sum(lanes[r * 3 + c]);
                    }
                }
            }
        }
    }
}

/// The 16 lanes added in a fixed tree: halves, then quarters, ...
fn tree_sum(mut lanes: [f32; 16]) -> f32 {
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// `M_ξ[r, i·tw + tx] = (A dY Aᵀ)_ξ` for the chunk's tiles, `dY` the 2x2 tile of `dy` (zero
/// where it falls outside the image): with `A`'s rows `(1, 0), (1, 1), (1, −1), (0, −1)`, each
/// axis maps `(y0, y1)` to `(y0, y0 + y1, y0 − y1, −y1)`. 16 tiles at a time, from the even and
/// odd columns of the tile row's two output rows.
///
/// # Safety
/// `V`'s instruction set is present; `s` fits `p`; `dy` is `[N, C_out, h, w]`.
#[inline(always)]
unsafe fn transform_grads<V: Lanes16>(p: &Plan, dy: &[f32], rows: Range<usize>, s: &mut Scratch) {
    let (h, w, tw, ld) = (p.h, p.w, p.tw, p.ld);
    let mp = s.m.as_mut_ptr();
    let stride = p.c_out * ld;
    for r in 0..p.c_out {
        for (i, tr) in rows.clone().enumerate() {
            let (n, ty) = (tr / p.th, tr % p.th);
            let plane = &dy[(n * p.c_out + r) * h * w..][..h * w];
            let row0 = plane[2 * ty * w..].as_ptr();
            let has_row1 = 2 * ty + 1 < h;
            for tx0 in (0..tw).step_by(16) {
                let (lo, hi) =
                    (lanes_below(w.saturating_sub(2 * tx0)), lanes_below(w.saturating_sub(2 * tx0 + 16)));
                // SAFETY: the masks keep the loads inside the tile row's output rows; the
                // stores write `tw` tiles of each `M` row (`fit`).
                unsafe {
                    let load = |q: *const f32| {
                        V::load_masked(lo, q.wrapping_add(2 * tx0))
                            .deinterleave(V::load_masked(hi, q.wrapping_add(2 * tx0 + 16)))
                    };
                    let (e0, o0) = load(row0);
                    let (e1, o1) = if has_row1 { load(row0.add(w)) } else { (V::zero(), V::zero()) };
                    let axis = |y0: V, y1: V| [y0, y0.add(y1), y0.sub(y1), V::zero().sub(y1)];
                    let (even, odd) = (axis(e0, e1), axis(o0, o1));
                    let m = lanes_below(tw - tx0);
                    let dst = mp.add(r * ld + i * tw + tx0);
                    for a in 0..4 {
                        for (b, v) in axis(even[a], odd[a]).into_iter().enumerate() {
                            v.store_masked(m, dst.add((4 * a + b) * stride));
                        }
                    }
                }
            }
        }
    }
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
    /// Length of a row buffer: `2·tw` rounded up to whole 32-lane pairs of vectors, plus the
    /// two columns a window reaches past its tile.
    fn padded(&self) -> usize {
        2 * self.tw.next_multiple_of(16) + 2
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
    /// The four rows of `Bᵀ d` of a tile row, by padded column ([`Plan::padded`] each; column
    /// `k` is input column `k − 1`), then a row of zeros (`w`) for window rows outside the
    /// image.
    rows: Vec<f32>,
    /// The four outputs of each of a chunk's tiles (`ld + 16` each), then the two output rows
    /// of a tile row (`padded` each).
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
        grow(&mut self.rows, 4 * p.padded() + p.w);
        grow(&mut self.out, 4 * (p.ld + 16) + 2 * p.padded());
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
    use super::{chunk_body, weight_body, Job, Plan, Range, Scratch};
    use crate::kernels::lanes::{Avx2, Avx2Half, Avx512};

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

    /// 8 output channels x 3 channels per pass: 24 accumulators of the 32 registers.
    ///
    /// # Safety
    /// AVX-512F present; as [`super::weight_chunk`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_avx512(
        p: &Plan,
        x: &[f32],
        dy: &[f32],
        rows: Range<usize>,
        s: &mut Scratch,
        du: &mut [f32],
    ) {
        // SAFETY: as the caller's.
        unsafe { weight_body::<Avx512, Avx512, 8, 24>(p, x, dy, rows, s, du) }
    }

    /// 4 output channels x 3 channels per pass, lanes 0..8 then 8..16: 12 of the 16 AVX2
    /// registers accumulate.
    ///
    /// # Safety
    /// AVX2 and FMA present; as [`super::weight_chunk`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_avx2(
        p: &Plan,
        x: &[f32],
        dy: &[f32],
        rows: Range<usize>,
        s: &mut Scratch,
        du: &mut [f32],
    ) {
        // SAFETY: as the caller's.
        unsafe { weight_body::<Avx2, Avx2Half, 4, 12>(p, x, dy, rows, s, du) }
    }
}

/// What every chunk of one call shares.
struct Job<'a> {
    plan: Plan,
    x: &'a [f32],
    u: Vec<PackedA>,
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
/// the chunk's first), `d` the 4x4 window of channel `c`: `Bᵀ d` down the columns of four input
/// rows, 16 columns at a time, then `(Bᵀ d) B` along them, 16 tiles at a time, the window's
/// columns taken from the even and odd padded columns.
///
/// # Safety
/// `V`'s instruction set is present; `s` fits `p`; `x` is `[N, C_in, h, w]`.
#[inline(always)]
unsafe fn transform_inputs<V: Lanes16>(p: &Plan, x: &[f32], rows: Range<usize>, s: &mut Scratch) {
    let (h, w, tw, ld) = (p.h, p.w, p.tw, p.ld);
    let padded = p.padded();
    let (q, zero) = s.rows.split_at_mut(4 * padded);
    let zero = &mut zero[..w];
    zero.fill(0.0);
    for qa in q.chunks_exact_mut(padded) {
        qa[0] = 0.0;
        qa[w + 1..].fill(0.0);
    }
    let qp = q.as_mut_ptr();
    let v = s.v.as_mut_ptr();
    let stride = p.c_in * ld;
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
            // SAFETY: the loads read `w` elements of each row and the stores write padded
            // columns 1..=w of each `q` row (`padded ≥ w + 2`); the second loop reads padded
            // columns up to `2·round16(tw) + 2 = padded` and stores `tw` tiles of each `V` row,
            // inside `s.v` (`fit`).
            unsafe {
                for k0 in (0..w).step_by(16) {
                    let m = lanes_below(w - k0);
                    let [d0, d1, d2, d3] = d.map(|r| V::load_masked(m, r.add(k0)));
                    let q_at = |a: usize| qp.add(a * padded + k0 + 1);
                    d0.sub(d2).store_masked(m, q_at(0));
                    d1.add(d2).store_masked(m, q_at(1));
                    d2.sub(d1).store_masked(m, q_at(2));
                    d1.sub(d3).store_masked(m, q_at(3));
                }
                for a in 0..4 {
                    let qa = qp.add(a * padded);
                    let base = v.add((4 * a * p.c_in + c) * ld + i * tw);
                    for tx0 in (0..tw).step_by(16) {
                        let m = lanes_below(tw - tx0);
                        let at = qa.add(2 * tx0);
                        // The window's columns 0..4 are padded columns 2tx .. 2tx + 3.
                        let (u0, u1) = V::load(at).deinterleave(V::load(at.add(16)));
                        let (u2, u3) = V::load(at.add(2)).deinterleave(V::load(at.add(18)));
                        let dst = base.add(tx0);
                        u0.sub(u2).store_masked(m, dst);
                        u1.add(u2).store_masked(m, dst.add(stride));
                        u2.sub(u1).store_masked(m, dst.add(2 * stride));
                        u1.sub(u3).store_masked(m, dst.add(3 * stride));
                    }
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` for the chunk's tiles, plus what the sums start from, written to the output rows
/// `2·ty` and `2·ty + 1` (those inside the image) of every output channel: the four outputs of
/// 16 tiles at a time, then per tile row the two output rows interleaved from them.
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
    let yl = ld + 16;
    let ys = s.out.as_mut_ptr();
    let (top, bottom) = (ys.wrapping_add(4 * yl), ys.wrapping_add(4 * yl + p.padded()));
    let m = s.m.as_ptr();
    let stride = p.c_out * ld;
    for r in 0..p.c_out {
        // SAFETY: the loads read columns below `cols ≤ ld` of the 16 `M` rows of output
        // channel `r`; the stores write `ld + 16` floats per output of `s.out` (`fit`).
        unsafe {
            let mr = m.add(r * ld);
            for j0 in (0..cols).step_by(16) {
                let mask = lanes_below(cols - j0);
                let ms: [V; 16] = std::array::from_fn(|xi| V::load_masked(mask, mr.add(xi * stride + j0)));
                // M A along each row (tile columns 0 and 1), then Aᵀ down the columns.
                let t0: [V; 4] = std::array::from_fn(|a| ms[4 * a].add(ms[4 * a + 1]).add(ms[4 * a + 2]));
                let t1: [V; 4] = std::array::from_fn(|a| ms[4 * a + 1].sub(ms[4 * a + 2]).sub(ms[4 * a + 3]));
                t0[0].add(t0[1]).add(t0[2]).store(ys.add(j0));
                t1[0].add(t1[1]).add(t1[2]).store(ys.add(yl + j0));
                t0[1].sub(t0[2]).sub(t0[3]).store(ys.add(2 * yl + j0));
                t1[1].sub(t1[2]).sub(t1[3]).store(ys.add(3 * yl + j0));
            }
        }
        for (i, tr) in rows.clone().enumerate() {
            let (n, ty) = (tr / p.th, tr % p.th);
            let bias = start.bias.map_or(0.0, |b| b[n * start.image_stride + r]);
            for di in 0..2 {
                let oy = 2 * ty + di;
                if oy >= h {
                    continue;
                }
                let at = ((n * p.c_out + r) * h + oy) * w;
                let res = start.residual.map(|res| res[at..at + w].as_ptr());
                // SAFETY: the loads read the tile row's `tw` (rounded up to 16) outputs of
                // `s.out` and write `2·round16(tw) = padded − 2` of the row buffer; the row of
                // `y` lies inside it (caller) and only this task writes it.
                unsafe {
                    let row = if di == 0 { top } else { bottom };
                    let (even, odd) = (ys.add(2 * di * yl + i * tw), ys.add((2 * di + 1) * yl + i * tw));
                    for tx0 in (0..tw).step_by(16) {
                        let (lo, hi) = V::load(even.add(tx0)).interleave(V::load(odd.add(tx0)));
                        lo.store(row.add(2 * tx0));
                        hi.store(row.add(2 * tx0 + 16));
                    }
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn same3x3(n: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Conv2dGeom {
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
        forward_on(isa, g, x, |r, c, t| w[(r * c_in + c) * 9 + t], start, crate::kernels::as_uninit(&mut y));
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
            prop_assert!(applies(&g));
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        /// The weight gradient through F(2x2, 3x3) against the direct sum in f64, on every level
        /// the machine runs with the scalar level's bits, and the same bits on one thread as on
        /// the pool (the parts do not depend on the threads).
        #[test]
        fn winograd_weight_gradient_matches_the_direct_sum_on_every_level_with_the_same_bits(
            n in 1usize..=3, c_in in 16usize..=21, c_out in 16usize..=27, h in 8usize..=19, w in 8usize..=19,
            seed in any::<u64>(),
        ) {
            let g = same3x3(n, c_in, c_out, h, w);
            let mut rng = crate::rng_from_seed(seed);
            let x = random_vec(&mut rng, g.x_len());
            let dy = random_vec(&mut rng, g.y_len());
            let mut want = vec![0.0f64; g.w_len()];
            let mut scale = vec![0.0f64; g.w_len()];
            for (nn, r, c, t) in weight_terms(g.n, g.c_out, g.c_in) {
                let (di, dj) = ((t / 3) as isize - 1, (t % 3) as isize - 1);
                for oy in 0..h {
                    for ox in 0..w {
                        let (iy, ix) = (oy as isize + di, ox as isize + dj);
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            let term = dy[((nn * c_out + r) * h + oy) * w + ox] as f64
                                * x[((nn * c_in + c) * h + iy as usize) * w + ix as usize] as f64;
                            want[(r * c_in + c) * 9 + t] += term;
                            scale[(r * c_in + c) * 9 + t] += term.abs();
                        }
                    }
                }
            }
            let run = |isa: Isa| {
                let mut dw = vec![f32::NAN; g.w_len()];
                backward_weight_on(isa, &g, &x, &dy, &mut dw);
                dw
            };
            let scalar = run(Isa::Scalar);
            for (k, (&got, (&v, &s))) in scalar.iter().zip(want.iter().zip(&scale)).enumerate() {
                prop_assert!((got as f64 - v).abs() <= 4e-6 * s + 1e-9, "dw[{}] = {}, want {} (scale {})", k, got, v, s);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for isa in Isa::available() {
                prop_assert_eq!(bits(&run(isa)), bits(&scalar), "{} differs from scalar", isa);
            }
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
            prop_assert_eq!(bits(&pool.install(|| run(Isa::Scalar))), bits(&scalar), "one thread");
        }
    }

    /// Every `(n, r, c, tap)` of a 3x3 weight gradient.
    fn weight_terms(n: usize, k: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..n).flat_map(move |a| {
            (0..k).flat_map(move |b| (0..c).flat_map(move |d| (0..9).map(move |t| (a, b, d, t))))
        })
    }

    #[test]
    fn applies_only_to_padded_3x3s_with_room_for_tiles() {
        assert!(applies(&same3x3(1, 16, 16, 8, 8)));
        assert!(!applies(&same3x3(1, 15, 16, 8, 8)), "too few input channels");
        assert!(!applies(&same3x3(1, 16, 8, 8, 8)), "too few output channels");
        assert!(!applies(&same3x3(1, 16, 16, 7, 8)), "image too small");
        assert!(!applies(&Conv2dGeom { stride: 2, ..same3x3(1, 16, 16, 8, 8) }));
        assert!(!applies(&Conv2dGeom { pad_top: 0, pad_bottom: 2, ..same3x3(1, 16, 16, 8, 8) }));
    }
}
