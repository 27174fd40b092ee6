//! Scalar functions written so that a loop over a slice vectorises: no libm calls, no branches
//! the compiler cannot turn into selects. The hot loops of group norm + SiLU, the SiLU op and the
//! attention softmax call these instead of `f32::exp`, which is a call into libm per element.
//!
//! Every function here uses plain `*` and `+` (no `mul_add`), so it returns the same bits on
//! every target the crate is compiled or dispatched for.

/// `e^x` for `x ≤ 0`, within 2 ulp of the correctly rounded value for `−86 ≤ x ≤ 0` (checked
/// against f64 on a dense grid in the tests below); exactly 0 for `x < −86` (where `e^x` is
/// below 4.5e-38, at the bottom of f32's normal range), and 1 for `x ≥ 0`.
///
/// Method (Cody & Waite range reduction, as in Cephes' `expf`): `x = n·ln 2 + r` with `n` the
/// nearest integer to `x·log₂e`, `|r| ≤ ln 2 / 2`; `e^r` by a degree-7 polynomial
/// (`1 + r + r²·P(r)`, Cephes' coefficients); `2^n` built directly in the exponent bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    let xc = x.clamp(-86.0, 0.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let er = p * (r * r) + r + 1.0;
    // n is in −125..=0, so n + 127 is a valid biased exponent.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -86.0 {
        0.0
    } else {
        er * two_n
    }
}

/// Logistic sigmoid `1/(1 + e^{−x})`, computed from `e^{−|x|}` so it never overflows:
/// `1/(1 + e)` for `x ≥ 0`, `e/(1 + e)` below. Exactly 0 below −86 and 1 above 17.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// Sum of `f(v)` over `xs`, accumulated in f64 in 8 independent lanes (element `i` goes to lane
/// `i mod 8`), the lanes then added in order. A fixed order, so a fixed result; the lanes let
/// the loop vectorise, which one serial f64 accumulator does not.
#[inline(always)]
pub fn sum_f64_lanes(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    acc.iter().sum()
}

crate::cpu::isa_dispatch! {
/// `x_i ← exp(x_i − max x) / Σ_j exp(x_j − max x)` (a softmax row, in place). The maximum and
/// the sum run in 16 lanes (element `i` in lane `i mod 16`) added in a fixed tree, so the result
/// is fixed and the loops vectorise; with one serial accumulator each row would wait on a
/// chain of dependent adds. Compiled for AVX-512 and AVX2 too, chosen at run time.
pub fn softmax_in_place(row: &mut [f32]) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    let max = tree(lanes, |a, b| if b > a { b } else { a });
    // Every exponent is ≤ 0.
    for v in row.iter_mut() {
        *v = exp_nonpositive(*v - max);
    }
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += v;
        }
    }
    for (s, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *s += v;
    }
    let inv = 1.0 / tree(lanes, |a, b| a + b);
    for v in row.iter_mut() {
        *v *= inv;
    }
}
}

crate::cpu::isa_dispatch! {
/// Softmax down each column of the `rows x ld` row-major block `s`: per column `j`,
/// `s[i, j] ← exp(s[i, j] − max_i s[i, j]) / Σ_i exp(s[i, j] − max_i s[i, j])`. The columns run
/// 16 at a time, one per lane, so nothing is reduced across lanes; each column's sum runs in 4
/// partial sums (rows `≡ 0, 1, 2, 3 mod 4`) added as `(s0 + s1) + (s2 + s3)`, so the result is
/// fixed. `ld` must be a multiple of 16.
///
/// # Panics
/// If `ld` is not a multiple of 16 or `s` has fewer than `rows·ld` elements.
pub fn softmax_columns_in_place(s: &mut [f32], rows: usize, ld: usize) {
    const LANES: usize = 16;
    assert!(
        ld.is_multiple_of(LANES) && s.len() >= rows * ld,
        "softmax_columns_in_place: {rows} x {ld} block"
    );
    for c0 in (0..ld).step_by(LANES) {
        let lane = |s: &[f32], r: usize| -> [f32; LANES] {
            s[r * ld + c0..r * ld + c0 + LANES].try_into().expect("the range is exactly LANES long")
        };
        let mut max = [f32::NEG_INFINITY; LANES];
        for r in 0..rows {
            for (m, v) in max.iter_mut().zip(lane(s, r)) {
                *m = if v > *m { v } else { *m };
            }
        }
        let mut sums = [[0.0f32; LANES]; 4];
        for r in 0..rows {
            let row = &mut s[r * ld + c0..r * ld + c0 + LANES];
            // Every exponent is ≤ 0.
            for ((v, m), acc) in row.iter_mut().zip(&max).zip(sums[r % 4].iter_mut()) {
                *v = exp_nonpositive(*v - m);
                *acc += *v;
            }
        }
        let mut inv = [0.0f32; LANES];
        for (l, i) in inv.iter_mut().enumerate() {
            *i = 1.0 / ((sums[0][l] + sums[1][l]) + (sums[2][l] + sums[3][l]));
        }
        for r in 0..rows {
            for (v, i) in s[r * ld + c0..r * ld + c0 + LANES].iter_mut().zip(&inv) {
                *v *= i;
            }
        }
    }
}
}

crate::cpu::isa_dispatch! {
/// The softmax gradient in place: `d_i ← y_i·(d_i − Σ_j d_j y_j)` for a row `y` of softmax
/// outputs and the upstream gradient `d`; the dot product in 16 lanes, as in
/// [`softmax_in_place`].
pub fn softmax_backward_in_place(d: &mut [f32], y: &[f32]) {
    assert_eq!(d.len(), y.len(), "softmax_backward_in_place: lengths differ");
    let mut lanes = [0.0f32; 16];
    let (mut dc, mut yc) = (d.chunks_exact(16), y.chunks_exact(16));
    for (a, b) in (&mut dc).zip(&mut yc) {
        for ((s, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    for ((s, &a), &b) in lanes.iter_mut().zip(dc.remainder()).zip(yc.remainder()) {
        *s += a * b;
    }
    let dot = tree(lanes, |a, b| a + b);
    for (d, &y) in d.iter_mut().zip(y) {
        *d = y * (*d - dot);
    }
}
}

/// Lanes combined pairwise: `lanes[l] ∘ lanes[l + width]` for halving widths.
#[inline(always)]
fn tree(mut lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] = op(lanes[l], lanes[l + width]);
        }
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_match_the_definition_in_f64() {
        // Lengths around the 16 lanes, values over a wide range (exponents down to −86).
        for len in [1usize, 2, 15, 16, 17, 33, 196, 257] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 97) as f32 * 0.9 - 40.0).collect();
            let mut got = row.clone();
            softmax_in_place(&mut got);
            // The differences from the maximum as f32 computes them (rounded once), the rest in
            // f64: what is left is the error of exp, the sum and the scaling.
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp()).collect();
            let total: f64 = exps.iter().sum();
            for (j, (&g, &e)) in got.iter().zip(&exps).enumerate() {
                let want = e / total;
                assert!((g as f64 - want).abs() <= 1e-6 * want + 1e-38, "len {len}, [{j}]: {g} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_columns_match_the_definition_in_f64() {
        // Column counts of one and two lane groups, row counts around the 4 partial sums,
        // values over a wide range; each column is a different shuffle.
        for (rows, ld) in [(1usize, 16usize), (3, 16), (4, 32), (7, 32), (49, 16), (196, 32)] {
            let block: Vec<f32> = (0..rows * ld).map(|i| ((i * 7919) % 97) as f32 * 0.9 - 40.0).collect();
            let mut got = block.clone();
            softmax_columns_in_place(&mut got, rows, ld);
            for j in 0..ld {
                let col: Vec<f32> = (0..rows).map(|i| block[i * ld + j]).collect();
                let max = col.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f64> = col.iter().map(|&v| ((v - max) as f64).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (i, &e) in exps.iter().enumerate() {
                    let (g, want) = (got[i * ld + j] as f64, e / total);
                    // exp_nonpositive is 0 below −86, where e^x < 4.5e-38.
                    assert!(
                        (g - want).abs() <= 1e-6 * want + 4.5e-38,
                        "{rows}x{ld} [{i}, {j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Distance in units in the last place between two positive finite f32.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_correctly_rounded_value() {
        let mut worst = (0, 0.0f32);
        for i in 0..=2_000_000 {
            let x = -86.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp() as f32;
            let d = ulps(exp_nonpositive(x), want);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 2, "exp_nonpositive is {} ulp off at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-86.5), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_matches_f64_and_saturates() {
        for i in -4000..=4000 {
            let x = i as f32 / 100.0;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = sigmoid(x) as f64;
            assert!((got - want).abs() <= 3e-7 * want.max(1e-30), "sigmoid({x}) = {got}, f64 says {want}");
        }
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert_eq!(sigmoid(0.0), 0.5);
    }

    #[test]
    fn lane_sum_equals_a_plain_sum_of_integers() {
        // Integers below 2^53 add exactly in any order, so the lanes must give the exact total.
        let xs: Vec<f32> = (0..1003).map(|i| (i % 17) as f32).collect();
        let want: f64 = xs.iter().map(|&v| v as f64).sum();
        assert_eq!(sum_f64_lanes(&xs, |v| v as f64), want);
        assert_eq!(sum_f64_lanes(&xs[..5], |v| (v as f64) * 2.0), 20.0);
    }
}
