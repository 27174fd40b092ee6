//! The weight gradient of the convolutions of [`super`], through the same tiles: `dU_ξ`
//! summed from the transformed inputs and the transformed output gradients, then `Gᵀ dU G`.

use std::ops::Range;

use rayon::prelude::*;

use super::{lanes_below, Plan, Scratch, SCRATCH};
use crate::cpu::Isa;
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::lanes::{Lanes16, Part, Portable};

/// `dW[r, c, t] = Σ_{n,p} dy[n, r, p]·x[n, c, p + offset(t)]` (overwritten), the weight gradient
/// of the convolution [`super::forward`] computes, through the same tiles: with `Y = Aᵀ (U ⊙ V) A` and
/// `U = G g Gᵀ`,
///
/// ```text
/// dU_ξ[r, c] = Σ_tiles (A dY Aᵀ)_ξ[r, tile] · V_ξ[c, tile],    dW[r, c] = Gᵀ dU[r, c] G,
/// ```
///
/// 16 multiply-adds per tile, channel and output channel against the direct sum's 36. The tiles
/// are summed in chunks (as in [`super::forward`]); chunks are grouped into at most [`PARTS`] parts by
/// their count alone, each part sums its chunks in order into its own `dU`, and the parts are
/// added in order: the result does not depend on the number of threads. Within a chunk each
/// `dU_ξ[r, c]` is summed in 16 lanes (lane `l` over the chunk's tiles `≡ l mod 16`), added in a
/// fixed tree, on every level. The caller has checked the lengths and that [`super::applies`] holds.
pub(in crate::kernels::conv) fn backward_weight(g: &Conv2dGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
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
const WEIGHT_MIN_TILES: usize = 2048;

/// Whether [`backward_weight`] is the faster route for this geometry (beyond [`super::applies`]).
pub(in crate::kernels::conv) fn weight_applies(g: &Conv2dGeom) -> bool {
    super::applies(g) && super::tiles(g) >= WEIGHT_MIN_TILES
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
    let mut parts = partials.into_iter();
    let mut du = parts.next().unwrap_or_else(|| vec![0.0; 16 * k_n * c_n]);
    for part in parts {
        for (a, &b) in du.iter_mut().zip(&part) {
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
        super::transform_inputs::<V>(p, x, rows.clone(), s);
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
                    // Whole groups of 16 tiles with plain loads, then the last with its lanes
                    // past the chunk's last tile loading as 0.
                    let whole = cols / 16 * 16;
                    // SAFETY: the lanes loaded lie in the chunk's columns of rows of `M` and
                    // `V` (`fit`); the caller's instruction set.
                    unsafe {
                        for j0 in (0..whole).step_by(16) {
                            dot_step::<P, RP, A>(&mut acc, &vr, &dm, j0 + part, None);
                        }
                        if whole < cols {
                            dot_step::<P, RP, A>(
                                &mut acc,
                                &vr,
                                &dm,
                                whole + part,
                                Some(lanes_below(cols - whole) >> part),
                            );
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

/// One group of tiles of the weight gradient's sums: `acc[3r + c] += dm[r]·vr[c]` at column
/// `j`, lanes under `mask` if given (the others load as 0).
///
/// # Safety
/// `P`'s instruction set is present; the lanes loaded lie inside the rows.
#[inline(always)]
unsafe fn dot_step<P: Part, const RP: usize, const A: usize>(
    acc: &mut [P; A],
    vr: &[*const f32; 3],
    dm: &[*const f32; RP],
    j: usize,
    mask: Option<u16>,
) {
    // SAFETY: as the caller's.
    unsafe {
        let load = |q: *const f32| match mask {
            None => P::load(q.add(j)),
            Some(m) => P::load_masked(m, q.add(j)),
        };
        let xs = [load(vr[0]), load(vr[1]), load(vr[2])];
        for r in 0..RP {
            let d = load(dm[r]);
            for c in 0..3 {
                acc[r * 3 + c] = acc[r * 3 + c].fmadd(d, xs[c]);
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
/// axis maps `(y0, y1)` to `(y0, y0 + y1, y0 − y1, −y1)`. The two output rows of each tile row
/// are laid end to end (`2·tw` columns each, zero past the image), so tile `j`'s columns are
/// elements `2j`, `2j + 1`, and the transform runs over the chunk 16 tiles at a time.
///
/// # Safety
/// `V`'s instruction set is present; `s` fits `p`; `dy` is `[N, C_out, h, w]`.
#[inline(always)]
unsafe fn transform_grads<V: Lanes16>(p: &Plan, dy: &[f32], rows: Range<usize>, s: &mut Scratch) {
    let (h, w, tw, ld) = (p.h, p.w, p.tw, p.ld);
    let span = 2 * tw;
    let cols = rows.len() * tw;
    let len = p.row_len();
    let mp = s.m.as_mut_ptr();
    let top = s.out.as_mut_ptr();
    let bottom = top.wrapping_add(len);
    let stride = p.c_out * ld;
    for r in 0..p.c_out {
        for (i, tr) in rows.clone().enumerate() {
            let (n, ty) = (tr / p.th, tr % p.th);
            let plane = &dy[(n * p.c_out + r) * h * w..][..h * w];
            for (di, buf) in [top, bottom].into_iter().enumerate() {
                let oy = 2 * ty + di;
                // SAFETY: the loads read row `oy` of the plane (`w` elements); the stores write
                // elements `i·2tw .. (i + 1)·2tw` of the row buffer (`len ≥ 2·cols`, `fit`).
                unsafe {
                    let dst = buf.add(i * span);
                    if oy < h {
                        let src = plane[oy * w..][..w].as_ptr();
                        for k0 in (0..w).step_by(16) {
                            let m = lanes_below(w - k0);
                            V::load_masked(m, src.add(k0)).store_masked(m, dst.add(k0));
                        }
                        for k in w..span {
                            *dst.add(k) = 0.0;
                        }
                    } else {
                        for k in 0..span {
                            *dst.add(k) = 0.0;
                        }
                    }
                }
            }
        }
        // SAFETY: the loads read `2·round16(cols) ≤ len` elements of each row buffer; the stores
        // write the chunk's `cols` tiles of each `M` row (`fit`).
        unsafe {
            let dst = mp.add(r * ld);
            for j0 in (0..cols).step_by(16) {
                let (e0, o0) = V::load(top.add(2 * j0)).deinterleave(V::load(top.add(2 * j0 + 16)));
                let (e1, o1) = V::load(bottom.add(2 * j0)).deinterleave(V::load(bottom.add(2 * j0 + 16)));
                let axis = |y0: V, y1: V| [y0, y0.add(y1), y0.sub(y1), V::zero().sub(y1)];
                let (even, odd) = (axis(e0, e1), axis(o0, o1));
                let m = lanes_below(cols - j0);
                for a in 0..4 {
                    for (b, v) in axis(even[a], odd[a]).into_iter().enumerate() {
                        v.store_masked(m, dst.add((4 * a + b) * stride + j0));
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{weight_body, Plan, Range, Scratch};
    use crate::kernels::lanes::{Avx2, Avx2Half, Avx512};

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

#[cfg(test)]
mod tests {
    use super::super::tests::{random_vec, same3x3};
    use super::*;
    use proptest::prelude::*;

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
}
