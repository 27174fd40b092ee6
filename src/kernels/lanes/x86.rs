//! The x86-64 lanes: AVX-512 ([`Avx512`]) and AVX2 with FMA ([`Avx2`], and [`Avx2Half`] for
//! kernels that work on 8 lanes at a time).

use std::arch::x86_64::*;

use super::Lanes16;

/// The 16 lanes in one AVX-512 register.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(__m512);

impl Lanes16 for Avx512 {
    type Mask = u16;
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mask(m: u16) -> u16 {
        m
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_under(m: u16, p: *const f32) -> Self {
        Avx512(_mm512_maskz_loadu_ps(m, p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn merge_under(self, m: u16, p: *const f32) -> Self {
        Avx512(_mm512_mask_loadu_ps(self.0, m, p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> Self {
        Avx512(_mm512_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(v: f32) -> Self {
        Avx512(_mm512_set1_ps(v))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> Self {
        Avx512(_mm512_loadu_ps(p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        Avx512(_mm512_maskz_loadu_ps(m, p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_merge(v: Self, m: u16, p: *const f32) -> Self {
        Avx512(_mm512_mask_loadu_ps(v.0, m, p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        _mm512_mask_storeu_ps(p, m, self.0)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(self, b: Self) -> Self {
        Avx512(_mm512_add_ps(self.0, b.0))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        Avx512(_mm512_fmadd_ps(a.0, b.0, self.0))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        Avx512(_mm512_mask_blend_ps(m, self.0, b.0))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sub(self, b: Self) -> Self {
        Avx512(_mm512_sub_ps(self.0, b.0))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn deinterleave(self, b: Self) -> (Self, Self) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (Avx512(_mm512_permutex2var_ps(self.0, even, b.0)), Avx512(_mm512_permutex2var_ps(self.0, odd, b.0)))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn interleave(self, odd: Self) -> (Self, Self) {
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        (Avx512(_mm512_permutex2var_ps(self.0, lo, odd.0)), Avx512(_mm512_permutex2var_ps(self.0, hi, odd.0)))
    }
}

/// Eight lanes in one AVX2 register: a [`super::Part`] of the 16.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Half(__m256);

impl super::Part for Avx2Half {
    const LANES: usize = 8;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> Self {
        Avx2Half(_mm256_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> Self {
        Avx2Half(_mm256_loadu_ps(p))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        Avx2Half(load_half(m & 0xFF, p, 0))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        Avx2Half(_mm256_fmadd_ps(a.0, b.0, self.0))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(v: f32) -> Self {
        Avx2Half(_mm256_set1_ps(v))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(self, b: Self) -> Self {
        Avx2Half(_mm256_add_ps(self.0, b.0))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        Avx2Half(_mm256_blendv_ps(self.0, b.0, _mm256_castsi256_ps(half_mask(m, 0))))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        match m & 0xFF {
            0xFF => _mm256_storeu_ps(p, self.0),
            0 => {}
            _ => _mm256_maskstore_ps(p, half_mask(m, 0), self.0),
        }
    }
    type Mask = __m256i;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mask(m: u16) -> __m256i {
        half_mask(m, 0)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_under(m: __m256i, p: *const f32) -> Self {
        Avx2Half(_mm256_maskload_ps(p, m))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn merge_under(self, m: __m256i, p: *const f32) -> Self {
        Avx2Half(_mm256_blendv_ps(self.0, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m)))
    }
}

/// The 16 lanes in two AVX2 registers: lanes 0..8, then 8..16.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2([__m256; 2]);

/// Per byte of a mask, its 8 lanes as AVX2 wants them: all bits set where the lane is on.
static MASKS: [[i32; 8]; 256] = {
    let mut t = [[0i32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            if m >> l & 1 != 0 {
                t[m][l] = -1;
            }
            l += 1;
        }
        m += 1;
    }
    t
};

/// The AVX2 mask of lanes `8h..8h+8` of `m`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn half_mask(m: u16, h: usize) -> __m256i {
    _mm256_loadu_si256(MASKS[((m >> (8 * h)) & 0xFF) as usize].as_ptr().cast())
}

/// Lanes `8h..8h+8` of `m` selected, the others 0.0 and not touched.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_half(m: u16, p: *const f32, h: usize) -> __m256 {
    match (m >> (8 * h)) & 0xFF {
        0xFF => _mm256_loadu_ps(p.wrapping_add(8 * h)),
        0 => _mm256_setzero_ps(),
        _ => _mm256_maskload_ps(p.wrapping_add(8 * h), half_mask(m, h)),
    }
}

impl Lanes16 for Avx2 {
    /// The two halves' masks as `vmaskmovps` takes them: one instruction per half, no branch.
    type Mask = [__m256i; 2];
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mask(m: u16) -> [__m256i; 2] {
        [half_mask(m, 0), half_mask(m, 1)]
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_under(m: [__m256i; 2], p: *const f32) -> Self {
        Avx2([_mm256_maskload_ps(p, m[0]), _mm256_maskload_ps(p.wrapping_add(8), m[1])])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn merge_under(self, m: [__m256i; 2], p: *const f32) -> Self {
        let v = Self::load_under(m, p);
        Avx2([
            _mm256_blendv_ps(self.0[0], v.0[0], _mm256_castsi256_ps(m[0])),
            _mm256_blendv_ps(self.0[1], v.0[1], _mm256_castsi256_ps(m[1])),
        ])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> Self {
        Avx2([_mm256_setzero_ps(); 2])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(v: f32) -> Self {
        let s = _mm256_set1_ps(v);
        Avx2([s, s])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> Self {
        Avx2([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        Avx2([load_half(m, p, 0), load_half(m, p, 1)])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_merge(v: Self, m: u16, p: *const f32) -> Self {
        if m == 0 {
            return v;
        }
        v.blend(m, Self::load_masked(m, p))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0[0]);
        _mm256_storeu_ps(p.add(8), self.0[1]);
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        for h in 0..2 {
            let q = p.wrapping_add(8 * h);
            match (m >> (8 * h)) & 0xFF {
                0xFF => _mm256_storeu_ps(q, self.0[h]),
                0 => {}
                _ => _mm256_maskstore_ps(q, half_mask(m, h), self.0[h]),
            }
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(self, b: Self) -> Self {
        Avx2([_mm256_add_ps(self.0[0], b.0[0]), _mm256_add_ps(self.0[1], b.0[1])])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        Avx2([_mm256_fmadd_ps(a.0[0], b.0[0], self.0[0]), _mm256_fmadd_ps(a.0[1], b.0[1], self.0[1])])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        let pick = |h: usize| _mm256_castsi256_ps(half_mask(m, h));
        Avx2([_mm256_blendv_ps(self.0[0], b.0[0], pick(0)), _mm256_blendv_ps(self.0[1], b.0[1], pick(1))])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sub(self, b: Self) -> Self {
        Avx2([_mm256_sub_ps(self.0[0], b.0[0]), _mm256_sub_ps(self.0[1], b.0[1])])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn deinterleave(self, b: Self) -> (Self, Self) {
        // Per pair of registers (16 lanes): the even (odd) lanes of each 128-bit half, then the
        // halves' 64-bit pieces put in order.
        let split = |x: __m256, y: __m256| {
            let e = _mm256_shuffle_ps::<0x88>(x, y);
            let o = _mm256_shuffle_ps::<0xDD>(x, y);
            let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
            (order(e), order(o))
        };
        let (e0, o0) = split(self.0[0], self.0[1]);
        let (e1, o1) = split(b.0[0], b.0[1]);
        (Avx2([e0, e1]), Avx2([o0, o1]))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn interleave(self, odd: Self) -> (Self, Self) {
        // Eight even and eight odd lanes make sixteen: unpack within 128-bit halves, then put
        // the halves in order.
        let join = |e: __m256, o: __m256| {
            let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
            [_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi)]
        };
        (Avx2(join(self.0[0], odd.0[0])), Avx2(join(self.0[1], odd.0[1])))
    }
}
