//! A matrix product whose left operand is packed once and reused: `out = A @ B (+ init)` with
//! `A: [rows, inner]` packed into 8-row panels and `B` read in place, one row of `B` per step of
//! the inner loop (`B[k, j]` at `b[k·ldb + j]`). This is the shape of every convolution product
//! of the U-Net: the forward pass (`A` = the weights `[C_out, C_in·kh·kw]`, `B` = a patch tile)
//! and the input gradient (`A` = the transposed weights, `B` = a tile of `dy`). Packing the
//! weights once per call, instead of once per tile and image as a general gemm does, and reading
//! the patch tile where im2col wrote it, removes both packing copies.
//!
//! The micro-kernel is written once over 16 lanes (`kernels/lanes/`) and run on the level's
//! lanes with that level's register blocking: 8 rows x 32 columns (16 accumulators) with
//! AVX-512, 4 x 16 with AVX2+FMA, 8 x 32 on the portable lanes. Blocking changes which outputs
//! one call computes, not how an output is summed: each is `init + Σ_k A[r,k]·B[k,j]`
//! accumulated in increasing `k`, one fused multiply-add per term, so every level gives the
//! same bits.

use super::lanes::{prefetch, Lanes16, Portable};

/// Rows per panel of a packed `A`.
pub(super) const MR: usize = 8;

/// `A` packed for [`gemm_packed`]: panel `q` holds rows `8q..8q+8`, stored `[inner][8]` (zero
/// rows pad the last panel).
#[derive(Clone, Debug)]
pub struct PackedA {
    pub(super) data: Vec<f32>,
    pub(super) rows: usize,
    pub(super) inner: usize,
}

impl PackedA {
    /// Packs `A[r, k] = a[r·rs + k·cs]` for `r < rows`, `k < inner`.
    ///
    /// # Panics
    /// If the view reaches past the end of `a`.
    pub fn new(a: &[f32], rows: usize, inner: usize, rs: usize, cs: usize) -> Self {
        let mut packed = Self { data: Vec::new(), rows: 0, inner: 0 };
        packed.repack(a, rows, inner, rs, cs);
        packed
    }

    /// [`PackedA::new`] into this one's memory, which is reused (it only grows).
    ///
    /// # Panics
    /// As [`PackedA::new`].
    pub fn repack(&mut self, a: &[f32], rows: usize, inner: usize, rs: usize, cs: usize) {
        if rows > 0 && inner > 0 {
            let last = (rows - 1) * rs + (inner - 1) * cs;
            assert!(
                last < a.len(),
                "PackedA: a {rows}x{inner} view with strides ({rs}, {cs}) overruns {}",
                a.len()
            );
        }
        let panels = rows.div_ceil(MR);
        let data = &mut self.data;
        data.clear();
        data.resize(panels * inner * MR, 0.0);
        for q in 0..panels {
            let panel = &mut data[q * inner * MR..(q + 1) * inner * MR];
            let live = MR.min(rows - q * MR);
            if rs == 1 {
                // A's columns are contiguous (a transposed operand): each step of the inner
                // dimension copies the panel's rows from one run of `a`.
                for k in 0..inner {
                    let src = &a[q * MR + k * cs..][..live];
                    panel[k * MR..k * MR + live].copy_from_slice(src);
                }
            } else {
                for r in 0..live {
                    let row = q * MR + r;
                    for k in 0..inner {
                        panel[k * MR + r] = a[row * rs + k * cs];
                    }
                }
            }
        }
        (self.rows, self.inner) = (rows, inner);
    }

    /// Packs `A[r, k] = f(r, k)` for `r < rows`, `k < inner`, the panels in parallel (for an `A`
    /// that is a reordering of stored weights, without materialising it first).
    pub fn from_fn(rows: usize, inner: usize, f: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        use rayon::prelude::*;
        let panels = rows.div_ceil(MR);
        let mut data = vec![0.0f32; panels * inner * MR];
        if inner > 0 {
            data.par_chunks_mut(inner * MR).enumerate().for_each(|(q, panel)| {
                for r in 0..MR.min(rows - q * MR) {
                    for k in 0..inner {
                        panel[k * MR + r] = f(q * MR + r, k);
                    }
                }
            });
        }
        Self { data, rows, inner }
    }

    /// Multiplies every element by `alpha` (each product rounded once).
    pub fn scale(&mut self, alpha: f32) {
        self.data.iter_mut().for_each(|v| *v *= alpha);
    }

    /// Rows of `A`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of `A` (the inner dimension of the product).
    pub fn inner(&self) -> usize {
        self.inner
    }
}

/// What each output starts from before the sum is added.
#[derive(Clone, Copy, Debug)]
pub enum Init<'a> {
    /// 0.
    Zero,
    /// `bias[r]` for row `r`.
    Bias(&'a [f32]),
    /// The value already in `out` (accumulate).
    Accumulate,
    /// `bias[r]` (0 without a bias) plus `residual` at the output's own place,
    /// `residual[r·ldout + j]`: a residual connection's sum, added without a pass of its own.
    Plus {
        /// Per row, if any.
        bias: Option<&'a [f32]>,
        /// Laid out as the output.
        residual: &'a [f32],
    },
}

/// `out[r·ldout + j] = init(r, j) + Σ_k A[r, k]·b[k·ldb + j]` for `r < a.rows()`, `j < cols`.
///
/// # Panics
/// If `b` or `out` is too short for the shapes and strides, or a bias has fewer than
/// `a.rows()` entries.
pub fn gemm_packed(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    cols: usize,
    out: &mut [f32],
    ldout: usize,
    init: Init<'_>,
) {
    if !check(a, b, ldb, cols, out.len(), ldout, init) {
        return;
    }
    // SAFETY: `check` keeps every access of the kernel inside `b` and `out`.
    unsafe { dispatch(a, b, ldb, cols, out.as_mut_ptr(), ldout, init) };
}

/// [`gemm_packed`] into memory that need not be initialised, for an `init` that does not read
/// `out` (not [`Init::Accumulate`]): every element `out[r·ldout + j]` of the product is written,
/// the others are left as they are.
///
/// # Panics
/// As [`gemm_packed`]; also for [`Init::Accumulate`].
pub fn gemm_packed_uninit(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    cols: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
    ldout: usize,
    init: Init<'_>,
) {
    assert!(!matches!(init, Init::Accumulate), "gemm_packed_uninit: Accumulate reads the output");
    if !check(a, b, ldb, cols, out.len(), ldout, init) {
        return;
    }
    // SAFETY: as in `gemm_packed`; the kernel stores each output (first block of the inner
    // dimension) before it reads it (later blocks), so it never reads uninitialised memory.
    unsafe { dispatch(a, b, ldb, cols, out.as_mut_ptr().cast(), ldout, init) };
}

/// The shape checks of [`gemm_packed`]; false when there is nothing to compute.
fn check(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    cols: usize,
    out_len: usize,
    ldout: usize,
    init: Init<'_>,
) -> bool {
    let (rows, inner) = (a.rows, a.inner);
    if rows == 0 || cols == 0 {
        return false;
    }
    assert!(cols <= ldout && (rows - 1) * ldout + cols <= out_len, "gemm_packed: out is too short");
    if inner > 0 {
        assert!(cols <= ldb && (inner - 1) * ldb + cols <= b.len(), "gemm_packed: b is too short");
    }
    if let Init::Bias(bias) | Init::Plus { bias: Some(bias), .. } = init {
        assert!(bias.len() >= rows, "gemm_packed: {} bias entries for {rows} rows", bias.len());
    }
    if let Init::Plus { residual, .. } = init {
        assert!((rows - 1) * ldout + cols <= residual.len(), "gemm_packed: residual is too short");
    }
    true
}

/// The product on the lanes of the active level ([`crate::cpu::active`]): one order of terms,
/// so one result, on every level.
///
/// # Safety
/// The shapes checked by [`check`], `out` valid for them.
unsafe fn dispatch(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    cols: usize,
    out: *mut f32,
    ldout: usize,
    init: Init<'_>,
) {
    use crate::cpu::Isa;
    match crate::cpu::active() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is at most what the machine runs (`cpu::active`).
        Isa::Avx512 => x86::gemm_avx512(a, b, ldb, cols, out, ldout, init),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::gemm_avx2(a, b, ldb, cols, out, ldout, init),
        // 4 x 16: 16 of NEON's 32 registers accumulate.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => gemm_lanes::<crate::kernels::lanes::Neon, 4, 1, 4>(a, b, ldb, cols, out, ldout, init),
        _ => gemm_lanes::<Portable, 8, 2, 16>(a, b, ldb, cols, out, ldout, init),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{gemm_lanes, Init, PackedA};
    use crate::kernels::lanes::{Avx2, Avx512};

    /// 8 rows x 32 columns per micro-kernel call: 16 accumulators of 16 lanes (of 32 registers).
    ///
    /// # Safety
    /// AVX-512F present; as [`super::dispatch`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_avx512(
        a: &PackedA,
        b: &[f32],
        ldb: usize,
        cols: usize,
        out: *mut f32,
        ldout: usize,
        init: Init<'_>,
    ) {
        gemm_lanes::<Avx512, 8, 2, 16>(a, b, ldb, cols, out, ldout, init)
    }

    /// 4 rows x 16 columns per call: 4 accumulators of 16 lanes, 8 of the 16 AVX2 registers,
    /// with two for `B` and one for the broadcast weight.
    ///
    /// # Safety
    /// AVX2 and FMA present; as [`super::dispatch`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_avx2(
        a: &PackedA,
        b: &[f32],
        ldb: usize,
        cols: usize,
        out: *mut f32,
        ldout: usize,
        init: Init<'_>,
    ) {
        gemm_lanes::<Avx2, 4, 1, 4>(a, b, ldb, cols, out, ldout, init)
    }
}

/// Columns per strip: two vectors of 16 lanes.
const NR: usize = 32;

/// Inner-dimension block.
const KC: usize = 128;

/// Mask of the first `n` (≤ 16) lanes.
fn mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// The product on lanes `V`, `R` rows of a panel by `H` vectors of 16 columns per micro-kernel
/// call (`N = R·H` accumulators). Each output is `init` plus its terms in increasing `k`, one
/// fused multiply-add each, whatever `V`, `R` and `H`: the same bits on every level.
///
/// # Safety
/// `V`'s instruction set present; as [`dispatch`].
#[inline(always)]
unsafe fn gemm_lanes<V: Lanes16, const R: usize, const H: usize, const N: usize>(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    cols: usize,
    out: *mut f32,
    ldout: usize,
    init: Init<'_>,
) {
    debug_assert!(R * H == N && MR.is_multiple_of(R) && 2 % H == 0);
    let (rows, inner) = (a.rows, a.inner);
    let (bp, op) = (b.as_ptr(), out);
    // The residual of `Init::Plus`, laid out as `out` (never read otherwise).
    let rp = match init {
        Init::Plus { residual, .. } => residual.as_ptr(),
        _ => std::ptr::null(),
    };
    // Column strips outer, row panels inner: a strip of B (inner x 32) stays in cache while
    // every panel of A passes over it.
    // The inner dimension is cut in blocks of KC so the strip's block (KC x 32 floats,
    // 16 KiB) stays in L1 across the panels; later blocks accumulate onto the stored
    // partial sums, which keeps the order of the terms (and so the bits) unchanged.
    for j0 in (0..cols).step_by(NR) {
        if !rp.is_null() && j0 + NR < cols {
            // The next strip's residual, one or two cache lines per row `ldout` apart,
            // which the hardware does not prefetch and the kernel's first load would wait on.
            for r in 0..rows {
                let p = rp.wrapping_add(r * ldout + j0 + NR);
                prefetch(p);
                prefetch(p.wrapping_add(NR.min(cols - j0 - NR) - 1));
            }
        }
        let n = NR.min(cols - j0);
        let masks = [mask(n), mask(n.saturating_sub(16))];
        let mut k0 = 0;
        loop {
            let kc = KC.min(inner - k0);
            let block_init = if k0 == 0 { init } else { Init::Accumulate };
            for q in 0..rows.div_ceil(MR) {
                let r0 = q * MR;
                let panel = a.data.as_ptr().add((q * inner + k0) * MR);
                let live = MR.min(rows - r0);
                for rr in (0..live).step_by(R) {
                    for hh in (0..2).step_by(H) {
                        if masks[hh] == 0 {
                            continue;
                        }
                        // Rows r0+rr.., columns j0+16hh.. of out; rows k0..k0+kc of b.
                        let col = j0 + 16 * hh;
                        let (b_blk, o_blk) = (bp.add(k0 * ldb + col), op.add((r0 + rr) * ldout + col));
                        let r_blk = rp.wrapping_add((r0 + rr) * ldout + col);
                        let call = Call {
                            panel: panel.add(rr),
                            inner: kc,
                            b: b_blk,
                            ldb,
                            out: o_blk,
                            residual: r_blk,
                            ldout,
                        };
                        kernel::<V, R, H, N>(&call, live - rr, &masks[hh..], block_init, r0 + rr);
                    }
                }
            }
            k0 += kc;
            if k0 >= inner {
                break;
            }
        }
    }
}

/// Where one micro-kernel call reads and writes.
struct Call {
    /// The panel at the block's first row and inner step (row `r`, step `k` at `r + k·MR`).
    panel: *const f32,
    inner: usize,
    b: *const f32,
    ldb: usize,
    out: *mut f32,
    /// `Init::Plus`'s residual at the block's place (read only for that init).
    residual: *const f32,
    ldout: usize,
}

/// One R x 16H block: `live` rows of it stored (the rest of the panel is padding), lanes of
/// vector `h` selected by `masks[h]`.
#[inline(always)]
unsafe fn kernel<V: Lanes16, const R: usize, const H: usize, const N: usize>(
    c: &Call,
    live: usize,
    masks: &[u16],
    init: Init<'_>,
    r0: usize,
) {
    // Loops over all R rows with constant bounds (rows past `live` skipped inside), so every
    // `acc` index is a constant after unrolling and the accumulators stay in registers.
    let mut acc = [V::zero(); N];
    for r in 0..R {
        if r >= live {
            continue;
        }
        let o = c.out.add(r * c.ldout);
        for h in 0..H {
            let (m, at) = (masks[h], 16 * h);
            acc[r * H + h] = match init {
                Init::Zero => V::zero(),
                Init::Bias(bias) => V::splat(*bias.get_unchecked(r0 + r)),
                // `m` may be empty and the pointer past `out`: a masked load touches nothing.
                Init::Accumulate => V::load_masked(m, o.wrapping_add(at)),
                Init::Plus { bias, .. } => {
                    let base = bias.map_or(V::zero(), |b| V::splat(*b.get_unchecked(r0 + r)));
                    base.add(V::load_masked(m, c.residual.wrapping_add(r * c.ldout + at)))
                }
            };
        }
    }
    // Whole vectors (every column block but a matrix's last) load without a mask.
    let whole = masks[..H].iter().all(|&m| m == u16::MAX);
    let mut prepared = [V::mask(0); H];
    for h in 0..H {
        prepared[h] = V::mask(masks[h]);
    }
    for k in 0..c.inner {
        let brow = c.b.add(k * c.ldb);
        let mut bv = [V::zero(); H];
        for (h, v) in bv.iter_mut().enumerate() {
            // `masks[h]` may be empty and the pointer past `b`: a masked load touches nothing.
            *v = if whole {
                V::load(brow.add(16 * h))
            } else {
                V::load_under(prepared[h], brow.wrapping_add(16 * h))
            };
        }
        let w = c.panel.add(k * MR);
        for r in 0..R {
            let wr = V::splat(*w.add(r));
            for h in 0..H {
                acc[r * H + h] = acc[r * H + h].fmadd(wr, bv[h]);
            }
        }
    }
    for r in 0..R {
        if r >= live {
            continue;
        }
        let o = c.out.add(r * c.ldout);
        for h in 0..H {
            acc[r * H + h].store_masked(masks[h], o.wrapping_add(16 * h));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    /// The reference loop: same terms, same order, one `mul_add` per term.
    fn portable(
        a: &PackedA,
        b: &[f32],
        ldb: usize,
        cols: usize,
        out: &mut [f32],
        ldout: usize,
        init: Init<'_>,
    ) {
        for r in 0..a.rows {
            let (q, lane) = (r / MR, r % MR);
            let panel = &a.data[q * a.inner * MR..(q + 1) * a.inner * MR];
            let row = &mut out[r * ldout..r * ldout + cols];
            match init {
                Init::Zero => row.fill(0.0),
                Init::Bias(bias) => row.fill(bias[r]),
                Init::Accumulate => {}
                Init::Plus { bias, residual } => {
                    let b = bias.map_or(0.0, |b| b[r]);
                    for (o, &v) in row.iter_mut().zip(&residual[r * ldout..r * ldout + cols]) {
                        *o = b + v;
                    }
                }
            }
            for k in 0..a.inner {
                let w = panel[k * MR + lane];
                for (o, &bv) in row.iter_mut().zip(&b[k * ldb..k * ldb + cols]) {
                    *o = w.mul_add(bv, *o);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Against an f64 reference, for every init, odd sizes (partial panels and column
        /// blocks), padded strides and a transposed A; and the dispatched path against the
        /// portable loop bit for bit.
        #[test]
        fn packed_gemm_matches_reference_and_portable_loop(
            rows in 1usize..20, inner in 0usize..40, cols in 1usize..70, pad in 0usize..3,
            trans in any::<bool>(), which in 0usize..5, seed in any::<u64>(),
        ) {
            let mut rng = crate::rng_from_seed(seed);
            let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
            let a = rand(rows * inner);
            let (ldb, ldout) = (cols + pad, cols + 2 * pad);
            let b = rand(inner.max(1) * ldb);
            let bias = rand(rows);
            let start = rand(rows * ldout);
            let residual = rand(rows * ldout);
            let packed = if trans {
                // a holds Aᵀ: A[r, k] = a[k·rows + r].
                PackedA::new(&a, rows, inner, 1, rows)
            } else {
                PackedA::new(&a, rows, inner, inner, 1)
            };
            let a_at = |r: usize, k: usize| if trans { a[k * rows + r] } else { a[r * inner + k] };
            let init = match which {
                0 => Init::Zero,
                1 => Init::Bias(&bias),
                2 => Init::Accumulate,
                3 => Init::Plus { bias: None, residual: &residual },
                _ => Init::Plus { bias: Some(&bias), residual: &residual },
            };
            let mut out = start.clone();
            gemm_packed(&packed, &b, ldb, cols, &mut out, ldout, init);
            let mut portable_out = start.clone();
            portable(&packed, &b, ldb, cols, &mut portable_out, ldout, init);
            for (r, &bias_r) in bias.iter().enumerate() {
                for j in 0..ldout {
                    let i = r * ldout + j;
                    if j >= cols {
                        prop_assert_eq!(out[i].to_bits(), start[i].to_bits(), "padding column {} written", j);
                        continue;
                    }
                    let base = match which {
                        0 => 0.0,
                        1 => bias_r as f64,
                        2 => start[i] as f64,
                        3 => residual[i] as f64,
                        _ => bias_r as f64 + residual[i] as f64,
                    };
                    let want = base + (0..inner).map(|k| a_at(r, k) as f64 * b[k * ldb + j] as f64).sum::<f64>();
                    prop_assert!((out[i] as f64 - want).abs() <= 1e-5 * (1.0 + inner as f64), "({r}, {j}): {} vs {want}", out[i]);
                    prop_assert_eq!(out[i].to_bits(), portable_out[i].to_bits(), "SIMD and portable differ at ({}, {})", r, j);
                }
            }
        }
    }
}
