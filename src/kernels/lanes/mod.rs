//! Sixteen `f32` lanes, whatever the machine's vector width: the one shape in which the products
//! and convolutions of `packed.rs` and `conv/implicit/` are written, so that each instruction
//! set runs the same sums in the same order and gives the same bits (docs/cpu.md).
//!
//! | type | holds the 16 lanes as | when |
//! |---|---|---|
//! | [`Avx512`] | one `__m512` | `DDPM_CPU` level `avx512` |
//! | [`Avx2`] | two `__m256` (lanes 0..8, 8..16) | level `avx2` |
//! | `Neon` | four `float32x4_t` | level `neon` (every aarch64 machine) |
//! | [`Portable`] | `[f32; 16]`, a loop per lane | level `scalar`, and every other architecture |
//!
//! Every operation is lane-wise, and the multiply-add is fused on every type (`f32::mul_add` in
//! the portable one), so a lane's value after the same sequence of operations is the same bits
//! on every type. Masks are `u16`, bit `l` for lane `l`; a masked-off lane of a load is neither
//! read nor allowed to fault, and loads as 0.0; a masked-off lane of a store is not written.
//!
//! The methods are `unsafe`: each type's may only run where its instruction set is present, and
//! the pointer ones read or write the lanes their mask selects. Kernels generic over [`Lanes16`]
//! are `#[inline(always)]` and instantiated inside a function that enables the type's target
//! features, so that every method inlines into one loop.

/// Sixteen `f32` lanes; see the module's documentation.
pub(crate) trait Lanes16: Copy {
    /// All lanes 0.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// Lanes `p[0..16]`.
    unsafe fn load(p: *const f32) -> Self;
    /// Lane `l` from `p[l]` where bit `l` of `m` is set, else 0.0 (and `p[l]` not touched).
    unsafe fn load_masked(m: u16, p: *const f32) -> Self;
    /// Lane `l` from `p[l]` where bit `l` of `m` is set, else `v`'s lane.
    unsafe fn load_merge(v: Self, m: u16, p: *const f32) -> Self;
    /// A mask in the form this type's masked loads take, for a loop that uses one mask many
    /// times ([`Lanes16::load_under`], [`Lanes16::merge_under`]).
    type Mask: Copy;
    /// `m` prepared.
    unsafe fn mask(m: u16) -> Self::Mask;
    /// [`Lanes16::load_masked`] under a prepared mask.
    unsafe fn load_under(m: Self::Mask, p: *const f32) -> Self;
    /// [`Lanes16::load_merge`] under a prepared mask: `p`'s lanes where `m` is on, else `self`'s.
    unsafe fn merge_under(self, m: Self::Mask, p: *const f32) -> Self;
    /// Lanes into `p[0..16]`.
    unsafe fn store(self, p: *mut f32);
    /// Lane `l` into `p[l]` where bit `l` of `m` is set; the others not touched.
    unsafe fn store_masked(self, m: u16, p: *mut f32);
    /// `self + b`, lane-wise.
    unsafe fn add(self, b: Self) -> Self;
    /// `a·b + self`, lane-wise, rounded once.
    unsafe fn fmadd(self, a: Self, b: Self) -> Self;
    /// `self − b`, lane-wise.
    unsafe fn sub(self, b: Self) -> Self;
    /// `b`'s lane where bit `l` of `m` is set, else `self`'s.
    unsafe fn blend(self, m: u16, b: Self) -> Self;
    /// The 32 lanes `self ‖ b` split by parity: `(e, o)` with `e[l]` = lane `2l` and `o[l]` =
    /// lane `2l + 1` of the 32.
    unsafe fn deinterleave(self, b: Self) -> (Self, Self);
    /// The inverse of [`Lanes16::deinterleave`]: `self` the even lanes of 32, `odd` the odd ones,
    /// returned as lanes 0..16 and 16..32.
    unsafe fn interleave(self, odd: Self) -> (Self, Self);
    /// The lanes, in order.
    #[cfg(test)]
    unsafe fn to_array(self) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        self.store(out.as_mut_ptr());
        out
    }
}

/// A register's worth of lanes, 16 or fewer: what a kernel that handles the 16 lanes in parts
/// works on (the weight gradient, whose accumulators do not all fit in AVX2's or NEON's
/// registers as whole 16-lane groups, runs over lanes 0..8 and then 8..16 on AVX2). Each lane
/// still takes the same operations in the same order, so the bits do not change.
pub(crate) trait Part: Copy {
    /// Lanes per part; divides 16.
    const LANES: usize;
    /// All lanes 0.
    unsafe fn zero() -> Self;
    /// Lanes `p[0..LANES]`.
    unsafe fn load(p: *const f32) -> Self;
    /// Lane `l` from `p[l]` where bit `l` of `m` is set, else 0.0 (`p[l]` not touched).
    unsafe fn load_masked(m: u16, p: *const f32) -> Self;
    /// Lanes into `p[0..LANES]`.
    unsafe fn store(self, p: *mut f32);
    /// `a·b + self`, rounded once.
    unsafe fn fmadd(self, a: Self, b: Self) -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// `self + b`.
    unsafe fn add(self, b: Self) -> Self;
    /// `b`'s lane where bit `l` of `m` is set, else `self`'s.
    unsafe fn blend(self, m: u16, b: Self) -> Self;
    /// Lane `l` into `p[l]` where bit `l` of `m` is set; the others not touched.
    unsafe fn store_masked(self, m: u16, p: *mut f32);
    /// A mask prepared for [`Part::load_under`] and [`Part::merge_under`] (bits past
    /// `LANES` ignored).
    type Mask: Copy;
    /// `m` prepared.
    unsafe fn mask(m: u16) -> Self::Mask;
    /// [`Part::load_masked`] under a prepared mask.
    unsafe fn load_under(m: Self::Mask, p: *const f32) -> Self;
    /// `p`'s lanes where `m` is on, else `self`'s.
    unsafe fn merge_under(self, m: Self::Mask, p: *const f32) -> Self;
}

impl<V: Lanes16> Part for V {
    type Mask = <V as Lanes16>::Mask;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        <V as Lanes16>::splat(v)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        <V as Lanes16>::add(self, b)
    }
    #[inline(always)]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        <V as Lanes16>::blend(self, m, b)
    }
    #[inline(always)]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        <V as Lanes16>::store_masked(self, m, p)
    }
    #[inline(always)]
    unsafe fn mask(m: u16) -> Self::Mask {
        <V as Lanes16>::mask(m)
    }
    #[inline(always)]
    unsafe fn load_under(m: Self::Mask, p: *const f32) -> Self {
        <V as Lanes16>::load_under(m, p)
    }
    #[inline(always)]
    unsafe fn merge_under(self, m: Self::Mask, p: *const f32) -> Self {
        <V as Lanes16>::merge_under(self, m, p)
    }
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        <V as Lanes16>::zero()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        <V as Lanes16>::load(p)
    }
    #[inline(always)]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        <V as Lanes16>::load_masked(m, p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        <V as Lanes16>::store(self, p)
    }
    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        <V as Lanes16>::fmadd(self, a, b)
    }
}

/// The portable lanes: a loop per lane, which the compiler vectorises where it can.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable([f32; 16]);

impl Lanes16 for Portable {
    type Mask = u16;
    #[inline(always)]
    unsafe fn mask(m: u16) -> u16 {
        m
    }
    #[inline(always)]
    unsafe fn load_under(m: u16, p: *const f32) -> Self {
        <Self as Lanes16>::load_masked(m, p)
    }
    #[inline(always)]
    unsafe fn merge_under(self, m: u16, p: *const f32) -> Self {
        <Self as Lanes16>::load_merge(self, m, p)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Portable([v; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::array::from_fn(|l| *p.add(l)))
    }
    #[inline(always)]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        Portable(std::array::from_fn(|l| if m >> l & 1 != 0 { *p.wrapping_add(l) } else { 0.0 }))
    }
    #[inline(always)]
    unsafe fn load_merge(v: Self, m: u16, p: *const f32) -> Self {
        Portable(std::array::from_fn(|l| if m >> l & 1 != 0 { *p.wrapping_add(l) } else { v.0[l] }))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (l, &v) in self.0.iter().enumerate() {
            *p.add(l) = v;
        }
    }
    #[inline(always)]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        for (l, &v) in self.0.iter().enumerate() {
            if m >> l & 1 != 0 {
                *p.wrapping_add(l) = v;
            }
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] + b.0[l]))
    }
    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| fused_mul_add(a.0[l], b.0[l], self.0[l])))
    }
    #[inline(always)]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        Portable(std::array::from_fn(|l| if m >> l & 1 != 0 { b.0[l] } else { self.0[l] }))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] - b.0[l]))
    }
    #[inline(always)]
    unsafe fn deinterleave(self, b: Self) -> (Self, Self) {
        let at = |i: usize| if i < 16 { self.0[i] } else { b.0[i - 16] };
        (Portable(std::array::from_fn(|l| at(2 * l))), Portable(std::array::from_fn(|l| at(2 * l + 1))))
    }
    #[inline(always)]
    unsafe fn interleave(self, odd: Self) -> (Self, Self) {
        let at = |i: usize| if i.is_multiple_of(2) { self.0[i / 2] } else { odd.0[i / 2] };
        (Portable(std::array::from_fn(at)), Portable(std::array::from_fn(|l| at(l + 16))))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx2Half, Avx512};

/// `a·b + c` rounded once to f32, as `f32::mul_add` (IEEE 754 fusedMultiplyAdd), without a
/// call into libm where the target has no fused multiply-add instruction (x86-64's baseline):
/// there `f32::mul_add` is a function call per term, which made the portable lanes 60 times
/// slower than the vector ones.
///
/// Method (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms
/// using rounding to odd", IEEE TC 2008): `a·b` is exact in f64 (48 significant bits); the sum
/// `s = a·b + c` in f64 with its exact error `e` (Knuth's TwoSum); if `e ≠ 0` and `s` is even,
/// `s` is replaced by its neighbour towards `e` — the sum rounded to odd in 53 bits. Rounding
/// that to 24 bits (`as f32`, to nearest) is the correctly rounded `a·b + c`, since 53 ≥ 24 + 2.
/// Checked against `f32::mul_add` in the tests, including halfway cases and subnormals.
#[inline(always)]
pub(crate) fn fused_mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        // The instruction itself, inline.
        return a.mul_add(b, c);
    }
    fused_mul_add_by_f64(a, b, c)
}

/// The f64 emulation of [`fused_mul_add`] (its documentation has the method), on every target.
#[inline(always)]
fn fused_mul_add_by_f64(a: f32, b: f32, c: f32) -> f32 {
    let p = f64::from(a) * f64::from(b);
    let c = f64::from(c);
    let s = p + c;
    // TwoSum: e = (p + c) − s exactly (no overflow for f32 inputs).
    let v = s - p;
    let e = (p - (s - v)) + (c - v);
    // Branch-free, so that the lanes' loop vectorises: the neighbour towards e is one step up
    // in magnitude (bits + 1) if e has s's sign, else down (bits − 1); taken only where e ≠ 0,
    // s's last bit is 0 and s is finite.
    let bits = s.to_bits();
    let toward = if (e > 0.0) == (s > 0.0) { 1u64 } else { u64::MAX };
    let take = u64::from(e != 0.0) & !bits & u64::from(s.is_finite());
    f64::from_bits(bits.wrapping_add(toward & take.wrapping_neg())) as f32
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::{Neon, NeonQuarter};

/// Asks for the cache line holding `p` to be brought into L1 (a hint: nothing where the
/// architecture has no such instruction in its baseline; never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64's baseline; a prefetch does not fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod arm;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One sequence of every operation, on lane type `V`.
    ///
    /// # Safety
    /// `V`'s instruction set must be present.
    #[inline(always)]
    unsafe fn exercise<V: Lanes16>(a: &[f32; 16], b: &[f32; 16], c: &[f32; 16], m: u16, n: u16) -> [f32; 16] {
        let (va, vb, vc) = (V::load(a.as_ptr()), V::load(b.as_ptr()), V::load(c.as_ptr()));
        let mut s = vc.fmadd(va, vb).add(V::splat(0.5));
        s = s.blend(m, V::load_masked(n, b.as_ptr()));
        s = V::load_merge(s, n & !m, c.as_ptr());
        // The prepared-mask forms give what the plain ones give: lanes of `s` where the two
        // agree (every lane, if they do), NaN elsewhere.
        let prepared = V::load_under(V::mask(m), a.as_ptr()).merge_under(V::mask(n & !m), b.as_ptr());
        let plain = V::load_merge(V::load_masked(m, a.as_ptr()), n & !m, b.as_ptr());
        let (pr, pl) = (prepared.to_array(), plain.to_array());
        let same = (0..16).fold(0u16, |acc, l| acc | u16::from(pr[l].to_bits() == pl[l].to_bits()) << l);
        s = V::splat(f32::NAN).blend(same, s);
        let mut out = *c;
        s.fmadd(V::zero(), va).store_masked(m | n, out.as_mut_ptr());
        out
    }

    /// The lane-moving operations and `sub` on lane type `V`: `a ‖ b` split by parity, the
    /// halves joined again, and `a − b`.
    ///
    /// # Safety
    /// `V`'s instruction set must be present.
    #[inline(always)]
    unsafe fn shuffle<V: Lanes16>(a: &[f32; 16], b: &[f32; 16]) -> [[f32; 16]; 5] {
        let (va, vb) = (V::load(a.as_ptr()), V::load(b.as_ptr()));
        let (e, o) = va.deinterleave(vb);
        let (lo, hi) = e.interleave(o);
        [e.to_array(), o.to_array(), lo.to_array(), hi.to_array(), va.sub(vb).to_array()]
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn shuffle_avx512(a: &[f32; 16], b: &[f32; 16]) -> [[f32; 16]; 5] {
        shuffle::<Avx512>(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn shuffle_avx2(a: &[f32; 16], b: &[f32; 16]) -> [[f32; 16]; 5] {
        shuffle::<Avx2>(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn exercise_avx512(a: &[f32; 16], b: &[f32; 16], c: &[f32; 16], m: u16, n: u16) -> [f32; 16] {
        exercise::<Avx512>(a, b, c, m, n)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exercise_avx2(a: &[f32; 16], b: &[f32; 16], c: &[f32; 16], m: u16, n: u16) -> [f32; 16] {
        exercise::<Avx2>(a, b, c, m, n)
    }

    /// An f32 from its sign, a biased exponent and a mantissa: every magnitude, subnormals too.
    fn f32_from(sign: bool, exp: u32, mantissa: u32) -> f32 {
        f32::from_bits(u32::from(sign) << 31 | (exp % 255) << 23 | (mantissa & 0x7F_FFFF))
    }

    #[test]
    fn fused_mul_add_emulation_rounds_halfway_cases_once() {
        // a·b = 1 + 2^-11 + 2^-24 lies exactly halfway between two f32 (their spacing is
        // 2^-23 in [1, 2)); c = 2^-80 puts the exact sum just above it, so the answer rounds
        // up. Rounded to f64 first, the sum loses c, lands on the midpoint, and rounds to even
        // (down): the double rounding the emulation must avoid.
        let (a, b, c) = (1.0 + 2f32.powi(-12), 1.0 + 2f32.powi(-12), 2f32.powi(-80));
        let up = 1.0 + 2f32.powi(-11) + 2f32.powi(-23);
        assert_eq!(a.mul_add(b, c), up);
        assert_eq!(
            ((f64::from(a) * f64::from(b) + f64::from(c)) as f32),
            up - 2f32.powi(-23),
            "double rounding"
        );
        assert_eq!(fused_mul_add_by_f64(a, b, c), up);
        assert_eq!(fused_mul_add_by_f64(a, b, -c), up - 2f32.powi(-23));
        assert_eq!(fused_mul_add_by_f64(-a, b, -c), -up);
        assert_eq!(fused_mul_add(a, b, c), up);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// The f64 emulation of the fused multiply-add is `f32::mul_add` bit for bit, over every
        /// sign, exponent (subnormal to overflow) and mantissa, and with operands drawn close
        /// together so that cancellation and halfway cases are common.
        #[test]
        fn fused_mul_add_emulation_is_the_correctly_rounded_result(
            s in any::<(bool, bool, bool)>(), e in (0u32..255, 0u32..255, 0u32..255),
            m in any::<(u32, u32, u32)>(), near in any::<bool>(),
        ) {
            let (a, b) = (f32_from(s.0, e.0, m.0), f32_from(s.1, e.1, m.1));
            // `near`: c close to −a·b, so the sum cancels and its low bits decide the rounding.
            let c = if near { -(a * b) * (1.0 + f32_from(false, 127 - 24 + e.2 % 8, m.2)) } else { f32_from(s.2, e.2, m.2) };
            let (want, got) = (a.mul_add(b, c), fused_mul_add_by_f64(a, b, c));
            prop_assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{a:e}·{b:e} + {c:e}: {want:e} vs {got:e}");
        }

        /// Products that land exactly halfway between two f32 (odd 12-bit mantissas multiply
        /// to a 24th bit), scaled over the exponent range, plus a small c of either sign or
        /// none: the cases where one rounding and two differ.
        #[test]
        fn fused_mul_add_emulation_is_exact_at_midpoints(
            i in 0u32..2048, j in 0u32..2048, (ea, eb) in (-60i32..60, -60i32..60),
            ec in -90i32..-20, sign in any::<(bool, bool)>(), with_c in any::<bool>(),
        ) {
            let a = (1.0 + (2 * i + 1) as f32 * 2f32.powi(-12)) * 2f32.powi(ea);
            let b = (1.0 + (2 * j + 1) as f32 * 2f32.powi(-12)) * 2f32.powi(eb);
            let a = if sign.0 { -a } else { a };
            let c = if with_c { a * b * 2f32.powi(ec) * if sign.1 { -1.0 } else { 1.0 } } else { 0.0 };
            let (want, got) = (a.mul_add(b, c), fused_mul_add_by_f64(a, b, c));
            prop_assert_eq!(want.to_bits(), got.to_bits(), "{:e}·{:e} + {:e}", a, b, c);
        }
    }

    #[test]
    fn deinterleave_and_interleave_move_every_lane_where_they_say() {
        let a: [f32; 16] = std::array::from_fn(|l| l as f32);
        let b: [f32; 16] = std::array::from_fn(|l| (16 + l) as f32);
        // SAFETY: the portable lanes run everywhere.
        let want = unsafe { shuffle::<Portable>(&a, &b) };
        for l in 0..16 {
            assert_eq!(want[0][l], (2 * l) as f32, "even lane {l}");
            assert_eq!(want[1][l], (2 * l + 1) as f32, "odd lane {l}");
            assert_eq!((want[2][l], want[3][l]), (a[l], b[l]), "interleave undoes deinterleave, lane {l}");
            assert_eq!(want[4][l], -16.0, "a − b, lane {l}");
        }
        let bits = |v: [[f32; 16]; 5]| v.map(|r| r.map(f32::to_bits));
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of aarch64's baseline.
        assert_eq!(bits(unsafe { shuffle::<Neon>(&a, &b) }), bits(want), "neon");
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::{active, Isa};
            if active() >= Isa::Avx2 {
                // SAFETY: AVX2 and FMA are present.
                assert_eq!(bits(unsafe { shuffle_avx2(&a, &b) }), bits(want), "avx2");
            }
            if active() >= Isa::Avx512 {
                // SAFETY: AVX-512F is present.
                assert_eq!(bits(unsafe { shuffle_avx512(&a, &b) }), bits(want), "avx512");
            }
        }
    }

    proptest! {
        /// Every lane type gives the portable lanes' bits, and those follow the definitions
        /// lane by lane (the fused multiply-add rounded once).
        #[test]
        fn every_lane_type_gives_the_portable_bits(
            a in prop::array::uniform16(-1e3f32..1e3), b in prop::array::uniform16(-1e3f32..1e3),
            c in prop::array::uniform16(-1e3f32..1e3), m in any::<u16>(), n in any::<u16>(),
        ) {
            // SAFETY: the portable lanes run everywhere.
            let want = unsafe { exercise::<Portable>(&a, &b, &c, m, n) };
            for l in 0..16 {
                let (on_m, on_n) = (m >> l & 1 != 0, n >> l & 1 != 0);
                // `f32::mul_add` is IEEE 754's fusedMultiplyAdd: a·b + c rounded once.
                let fused = a[l].mul_add(b[l], c[l]) + 0.5;
                let s = if on_m { if on_n { b[l] } else { 0.0 } } else if on_n { c[l] } else { fused };
                let expect = if on_m || on_n { s } else { c[l] };
                prop_assert_eq!(want[l].to_bits(), expect.to_bits(), "lane {}", l);
            }
            #[cfg(target_arch = "aarch64")]
            {
                // SAFETY: NEON is part of aarch64's baseline.
                let got = unsafe { exercise::<Neon>(&a, &b, &c, m, n) };
                prop_assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "neon");
            }
            #[cfg(target_arch = "x86_64")]
            {
                use crate::cpu::{Isa, active};
                if active() >= Isa::Avx2 {
                    // SAFETY: AVX2 and FMA are present.
                    let got = unsafe { exercise_avx2(&a, &b, &c, m, n) };
                    prop_assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "avx2");
                }
                if active() >= Isa::Avx512 {
                    // SAFETY: AVX-512F is present.
                    let got = unsafe { exercise_avx512(&a, &b, &c, m, n) };
                    prop_assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "avx512");
                }
            }
        }
    }
}
