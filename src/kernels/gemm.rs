//! Single-precision matrix multiply on row-major slices, on the packed micro-kernel of
//! `packed.rs`: every output is `init + Σ_k (α·A[r, k])·B[k, j]` summed in increasing `k`, one
//! fused multiply-add a term, on every instruction-set level and so on every machine (until
//! 2026-12 this was the `gemm` crate, whose kernels, chosen from the machine, gave other bits on
//! other vector widths; benches/README.md has both measured).
//!
//! The views take a row stride and a column stride for every operand: A is packed from any
//! strides; B is read in place when its rows are runs of memory, else copied row-major first
//! (a transposed operand); both buffers are kept per thread. The public entry points split the
//! work over rayon in blocks whose size depends only on the shape, never on the number of
//! threads, and no task reduces into another's output, so results are bit-identical however
//! many threads run them.
//!
//! `MatRef`, `MatMut` and `gemm` are the crate-internal strided views that the convolution
//! kernels use to multiply sub-blocks of larger buffers without copying them.

use std::cell::RefCell;

use rayon::prelude::*;

use super::packed::{gemm_packed, Init, PackedA};

/// Rows of C computed by one rayon task when a single [`sgemm`] is split.
const ROW_BLOCK: usize = 32;

/// A single [`sgemm`] with fewer multiply-adds (`m·k·n`) than this runs on the calling thread:
/// below it, splitting costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 18;

/// Number of elements a strided `rows × cols` view addresses, counted from its first element.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A read-only `rows × cols` matrix inside a slice: element `(r, c)` is `data[r*rs + c*cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view of `data`.
    ///
    /// # Panics
    /// If the view would address an element past the end of `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let need = span(rows, cols, rs, cs);
        assert!(
            need <= data.len(),
            "MatRef: a {rows}x{cols} view with strides ({rs}, {cs}) needs {need} elements, slice has {}",
            data.len()
        );
        Self { data, rows, cols, rs, cs }
    }

    /// The row-major `rows × cols` matrix stored contiguously in `data`.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose, as a view of the same elements (strides swapped).
    pub(crate) fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// A writable `rows × cols` matrix inside a slice with unit column stride: element `(r, c)` is
/// `data[r*rs + c]`, and `rs >= cols` so no two elements alias.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// A view of `rows` rows of `cols` elements each, `rs` elements apart.
    ///
    /// # Panics
    /// If rows would overlap (`rs < cols` with more than one row) or the view would address an
    /// element past the end of `data`.
    pub(crate) fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            rows <= 1 || rs >= cols,
            "MatMut: row stride {rs} is smaller than the row length {cols}, rows would overlap"
        );
        let need = span(rows, cols, rs, 1);
        assert!(
            need <= data.len(),
            "MatMut: a {rows}x{cols} view with row stride {rs} needs {need} elements, slice has {}",
            data.len()
        );
        Self { data, rows, cols, rs }
    }

    /// The row-major `rows × cols` matrix stored contiguously in `data`.
    pub(crate) fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }
}

/// `C = alpha · A @ B + beta · C` on strided views, on the calling thread.
///
/// When `beta == 0` the old contents of C are not read (a NaN there does not propagate).
///
/// # Panics
/// If the shapes do not chain: `A` is `[m, k]`, `B` must be `[k, n]` and `C` `[m, n]`.
pub(crate) fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    assert_eq!(
        a.cols, b.rows,
        "gemm: inner dimensions differ, A is {}x{} and B is {}x{}",
        a.rows, a.cols, b.rows, b.cols
    );
    assert_eq!(
        (a.rows, b.cols),
        (c.rows, c.cols),
        "gemm: C is {}x{} but A @ B is {}x{}",
        c.rows,
        c.cols,
        a.rows,
        b.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        // An empty sum: C = beta · C (and exactly zero when beta is 0, as in BLAS).
        for r in 0..c.rows {
            let row = &mut c.data[r * c.rs..r * c.rs + c.cols];
            if beta == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|v| *v *= beta);
            }
        }
        return;
    }
    // Every output in one order on every machine and level: the packed kernel sums
    // `init + Σ_k (α·A[r, k])·B[k, j]` in increasing k, one fused multiply-add a term.
    SCRATCH.with_borrow_mut(|(packed, copy)| {
        packed.repack(a.data, a.rows, a.cols, a.rs, a.cs);
        if alpha != 1.0 {
            packed.scale(alpha);
        }
        product(packed, b, beta, c, copy);
    });
}

/// [`gemm`] with `α·A` packed by the caller (an operand that several products share).
///
/// # Panics
/// If the shapes do not chain, as [`gemm`].
pub(crate) fn gemm_packed_a(a: &PackedA, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    assert_eq!(
        (a.rows(), a.inner(), b.cols),
        (c.rows, b.rows, c.cols),
        "gemm: A ({}x{}) @ B ({}x{}) into C ({}x{})",
        a.rows(),
        a.inner(),
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(_, copy)| product(a, b, beta, c, copy));
}

/// `C = A @ B + β·C` for a packed, non-empty `A` and shapes that chain; `copy` holds B
/// row-major when its rows are not runs of memory.
fn product(a: &PackedA, b: MatRef<'_>, beta: f32, c: MatMut<'_>, copy: &mut Vec<f32>) {
    let init = if beta == 0.0 {
        Init::Zero
    } else {
        if beta != 1.0 {
            for r in 0..c.rows {
                c.data[r * c.rs..r * c.rs + c.cols].iter_mut().for_each(|v| *v *= beta);
            }
        }
        Init::Accumulate
    };
    // A single row's stride is never used; the kernel asks only that it be at least the row.
    let ldout = if c.rows == 1 { c.rs.max(c.cols) } else { c.rs };
    let (b_data, ldb) = if b.cs == 1 && b.rs >= b.cols {
        (b.data, b.rs)
    } else {
        // B's rows are not runs of memory (a transposed operand): laid out row-major first.
        row_major_copy(b, copy);
        (copy.as_slice(), b.cols)
    };
    gemm_packed(a, b_data, ldb, c.cols, c.data, ldout, init);
}

thread_local! {
    /// [`gemm`]'s packing of A and row-major copy of B, kept per thread between calls (they
    /// only grow). `gemm` runs on its calling thread and calls nothing that could run another
    /// `gemm` there, so the borrow is never taken twice.
    static SCRATCH: RefCell<(PackedA, Vec<f32>)> = RefCell::new((PackedA::new(&[], 0, 0, 0, 0), Vec::new()));
}

/// `b`'s elements in row-major order into `out`: each row written in one run, the reads
/// strided (for a transposed operand, one element of each of `b.cols` runs, which stay in cache
/// from one row to the next).
fn row_major_copy(b: MatRef<'_>, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(b.rows * b.cols);
    for k in 0..b.rows {
        let row = &b.data[k * b.rs..];
        out.extend(row.iter().step_by(b.cs).take(b.cols));
    }
}

/// `C = alpha · op(A) @ op(B) + beta · C`, row-major; `op` transposes when its flag is set.
///
/// `A` is `[m, k]` (stored `[k, m]` if `trans_a`), `B` is `[k, n]` (stored `[n, k]` if
/// `trans_b`), `C` is `[m, n]`. As in BLAS, when `beta == 0` the old contents of `C` are not read,
/// so a NaN there does not propagate. Large products are split over rayon in fixed blocks of rows
/// of `C`; each element of `C` is computed by one task in the same order whatever the thread
/// count, so the result is bit-identical for any number of threads.
///
/// # Panics
/// If `a`, `b` or `c` does not have exactly `m·k`, `k·n` or `m·n` elements.
#[allow(clippy::too_many_arguments)] // the BLAS signature, kept so call sites read like BLAS
pub fn sgemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    assert_eq!(a.len(), m * k, "sgemm: A has {} elements, expected m*k = {m}*{k}", a.len());
    assert_eq!(b.len(), k * n, "sgemm: B has {} elements, expected k*n = {k}*{n}", b.len());
    assert_eq!(c.len(), m * n, "sgemm: C has {} elements, expected m*n = {m}*{n}", c.len());
    #[cfg(feature = "wgpu")]
    if crate::gpu::sgemm(trans_a, trans_b, m, k, n, alpha, a, b, beta, c) {
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let b_view = if trans_b { MatRef::row_major(b, n, k).t() } else { MatRef::row_major(b, k, n) };
    // Rows r0..r0+rows of op(A).
    let a_rows = |r0: usize, rows: usize| {
        if trans_a {
            MatRef::new(&a[r0..], rows, k, 1, m)
        } else {
            MatRef::row_major(&a[r0 * k..], rows, k)
        }
    };
    if m > ROW_BLOCK && m * k * n >= PAR_MIN_MACS {
        c.par_chunks_mut(ROW_BLOCK * n).enumerate().for_each(|(block, c_block)| {
            let rows = c_block.len() / n;
            gemm(alpha, a_rows(block * ROW_BLOCK, rows), b_view, beta, MatMut::row_major(c_block, rows, n));
        });
    } else {
        gemm(alpha, a_rows(0, m), b_view, beta, MatMut::row_major(c, m, n));
    }
}

/// Batched [`sgemm`]: for each `i` in `0..batch`, `C_i = alpha · op(A_i) @ op(B_i) + beta · C_i`.
///
/// The batches are contiguous: `A_i = a[i·m·k..(i+1)·m·k]`, `B_i = b[i·k·n..]`,
/// `C_i = c[i·m·n..]`, each laid out as in [`sgemm`]. Parallel over the batch with rayon (and
/// within a large product as [`sgemm`] is); each `C_i` is written by its own task, so the result
/// is bit-identical for any number of threads.
///
/// # Panics
/// If `a`, `b` or `c` does not have exactly `batch·m·k`, `batch·k·n` or `batch·m·n` elements.
#[allow(clippy::too_many_arguments)] // the BLAS signature, kept so call sites read like BLAS
pub fn sgemm_batched(
    batch: usize,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    let (a_len, b_len, c_len) = (m * k, k * n, m * n);
    assert_eq!(
        a.len(),
        batch * a_len,
        "sgemm_batched: A has {} elements, expected batch*m*k = {batch}*{m}*{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        batch * b_len,
        "sgemm_batched: B has {} elements, expected batch*k*n = {batch}*{k}*{n}",
        b.len()
    );
    assert_eq!(
        c.len(),
        batch * c_len,
        "sgemm_batched: C has {} elements, expected batch*m*n = {batch}*{m}*{n}",
        c.len()
    );
    if c_len == 0 {
        return;
    }
    #[cfg(feature = "wgpu")]
    if crate::gpu::sgemm_batched(batch, trans_a, trans_b, m, k, n, alpha, a, b, beta, c) {
        return;
    }
    c.par_chunks_mut(c_len).enumerate().for_each(|(i, c_i)| {
        let a_i = &a[i * a_len..(i + 1) * a_len];
        let b_i = &b[i * b_len..(i + 1) * b_len];
        sgemm(trans_a, trans_b, m, k, n, alpha, a_i, b_i, beta, c_i);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng as _;

    fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Reference `alpha·op(A)@op(B) + beta·C` in f64, with the sum of the absolute values of
    /// the terms of each element (the scale its rounding error is measured against).
    #[allow(clippy::too_many_arguments)]
    fn sgemm_ref(
        trans_a: bool,
        trans_b: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let av = if trans_a { a[l * m + i] } else { a[i * k + l] } as f64;
                    let bv = if trans_b { b[j * k + l] } else { b[l * n + j] } as f64;
                    acc += av * bv;
                    abs += (av * bv).abs();
                }
                let cv = if beta == 0.0 { 0.0 } else { beta as f64 * c[i * n + j] as f64 };
                out[i * n + j] = alpha as f64 * acc + cv;
                scale[i * n + j] = (alpha as f64).abs() * abs + cv.abs();
            }
        }
        (out, scale)
    }

    fn assert_close(got: &[f32], want: &[f64], scale: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (idx, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(err <= 1e-5 * s + 1e-12, "{what}[{idx}]: got {g}, want {w} (scale {s}, err {err})");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_sgemm(
        seed: u64,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        beta: f32,
    ) {
        let mut rng = crate::rng_from_seed(seed);
        let a = random_vec(&mut rng, m * k);
        let b = random_vec(&mut rng, k * n);
        let c0 = random_vec(&mut rng, m * n);
        let (want, scale) = sgemm_ref(trans_a, trans_b, m, k, n, alpha, &a, &b, beta, &c0);
        let mut c = c0.clone();
        sgemm(trans_a, trans_b, m, k, n, alpha, &a, &b, beta, &mut c);
        assert_close(&c, &want, &scale, &format!("sgemm(ta={trans_a}, tb={trans_b}, {m}x{k}x{n})"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn sgemm_matches_f64_reference_for_all_transposes(
            seed in any::<u64>(),
            trans_a in any::<bool>(),
            trans_b in any::<bool>(),
            m in 1usize..=17,
            k in 0usize..=17,
            n in 1usize..=17,
            alpha in prop_oneof![Just(1.0f32), -2.0f32..2.0],
            beta in prop_oneof![Just(0.0f32), Just(1.0f32), -2.0f32..2.0],
        ) {
            check_sgemm(seed, trans_a, trans_b, m, k, n, alpha, beta);
        }

        /// The canonical order, bit for bit: `β·C` (when β ≠ 0), then one fused multiply-add
        /// per term `(α·A[r, k])·B[k, j]` in increasing k. The same bits on every level (CI runs
        /// this under each `DDPM_CPU`) and so on every machine; a kernel that split the sum into
        /// blocks or partial sums would fail it.
        #[test]
        fn sgemm_sums_in_the_canonical_order(
            seed in any::<u64>(),
            trans_a in any::<bool>(),
            trans_b in any::<bool>(),
            m in 1usize..=20,
            k in 0usize..=300,
            n in 1usize..=40,
            alpha in prop_oneof![Just(1.0f32), -2.0f32..2.0],
            beta in prop_oneof![Just(0.0f32), Just(1.0f32), -2.0f32..2.0],
        ) {
            let mut rng = crate::rng_from_seed(seed);
            let (a, b) = (random_vec(&mut rng, m * k), random_vec(&mut rng, k * n));
            let c0 = random_vec(&mut rng, m * n);
            let mut c = c0.clone();
            sgemm(trans_a, trans_b, m, k, n, alpha, &a, &b, beta, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let mut want = if beta == 0.0 { 0.0 } else { beta * c0[i * n + j] };
                    for l in 0..k {
                        let av = if trans_a { a[l * m + i] } else { a[i * k + l] };
                        let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                        want = (alpha * av).mul_add(bv, want);
                    }
                    prop_assert_eq!(c[i * n + j].to_bits(), want.to_bits(), "C[{}, {}]", i, j);
                }
            }
        }

        #[test]
        fn sgemm_batched_equals_sgemm_on_each_item(
            seed in any::<u64>(),
            batch in 0usize..=4,
            trans_a in any::<bool>(),
            trans_b in any::<bool>(),
            m in 1usize..=9,
            k in 1usize..=9,
            n in 1usize..=9,
            beta in prop_oneof![Just(0.0f32), -2.0f32..2.0],
        ) {
            let mut rng = crate::rng_from_seed(seed);
            let a = random_vec(&mut rng, batch * m * k);
            let b = random_vec(&mut rng, batch * k * n);
            let c0 = random_vec(&mut rng, batch * m * n);
            let mut c = c0.clone();
            sgemm_batched(batch, trans_a, trans_b, m, k, n, 0.5, &a, &b, beta, &mut c);
            for i in 0..batch {
                let mut c_i = c0[i * m * n..(i + 1) * m * n].to_vec();
                let a_i = &a[i * m * k..(i + 1) * m * k];
                let b_i = &b[i * k * n..(i + 1) * k * n];
                sgemm(trans_a, trans_b, m, k, n, 0.5, a_i, b_i, beta, &mut c_i);
                prop_assert_eq!(&c[i * m * n..(i + 1) * m * n], &c_i[..]);
            }
        }
    }

    #[test]
    fn sgemm_split_over_row_blocks_matches_reference() {
        // m·k·n is above PAR_MIN_MACS and m is not a multiple of ROW_BLOCK, so the parallel path
        // runs with a short last block.
        for (seed, (ta, tb)) in
            [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate()
        {
            check_sgemm(seed as u64, ta, tb, 101, 53, 67, 1.5, 0.5);
        }
    }

    #[test]
    fn sgemm_with_zero_beta_ignores_nan_in_c() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [f32::NAN; 4];
        sgemm(false, false, 2, 2, 2, 1.0, &a, &b, 0.0, &mut c);
        assert_eq!(c, a);
    }

    #[test]
    fn sgemm_with_zero_inner_dimension_scales_c_by_beta() {
        let mut c = [1.0, -2.0, 3.0];
        sgemm(false, false, 3, 0, 1, 1.0, &[], &[], 2.0, &mut c);
        assert_eq!(c, [2.0, -4.0, 6.0]);
    }

    #[test]
    #[should_panic(expected = "sgemm: B has 5 elements")]
    fn sgemm_panics_naming_the_mismatched_operand() {
        let mut c = [0.0; 4];
        sgemm(false, false, 2, 3, 2, 1.0, &[0.0; 6], &[0.0; 5], 0.0, &mut c);
    }

    #[test]
    fn sgemm_is_bit_identical_across_thread_counts() {
        let mut rng = crate::rng_from_seed(7);
        let (m, k, n) = (130, 70, 90);
        let a = random_vec(&mut rng, m * k);
        let b = random_vec(&mut rng, k * n);
        let run = |threads: usize| {
            let pool =
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("building a rayon pool");
            pool.install(|| {
                let mut c = vec![0.0; 3 * m * n];
                let a3: Vec<f32> = a.iter().chain(&a).chain(&a).copied().collect();
                let b3: Vec<f32> = b.iter().chain(&b).chain(&b).copied().collect();
                sgemm_batched(3, true, false, m, k, n, 1.0, &a3, &b3, 0.0, &mut c);
                c
            })
        };
        let one = run(1);
        let three = run(3);
        assert!(one.iter().zip(&three).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
