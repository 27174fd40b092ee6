//! The aarch64 lanes: NEON ([`Neon`], and [`NeonQuarter`] for kernels that work on 4 lanes at a
//! time).

use std::arch::aarch64::*;

use super::Lanes16;

/// The 16 lanes in four NEON registers (lanes 0..4, 4..8, 8..12, 12..16). NEON is part of
/// aarch64's baseline, so these run on every aarch64 machine. NEON has no masked loads or
/// stores: a quarter whose mask is whole or empty takes one instruction, a partial one goes
/// lane by lane.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Neon([float32x4_t; 4]);

/// Four lanes in one NEON register: a [`super::Part`] of the 16.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NeonQuarter(float32x4_t);

impl super::Part for NeonQuarter {
    const LANES: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        NeonQuarter(vdupq_n_f32(0.0))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        NeonQuarter(vld1q_f32(p))
    }
    #[inline(always)]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        NeonQuarter(match nibble(m, 0) {
            0xF => vld1q_f32(p),
            0 => vdupq_n_f32(0.0),
            n => {
                let lanes: [f32; 4] =
                    std::array::from_fn(|l| if n >> l & 1 != 0 { *p.wrapping_add(l) } else { 0.0 });
                vld1q_f32(lanes.as_ptr())
            }
        })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        vst1q_f32(p, self.0)
    }
    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        NeonQuarter(vfmaq_f32(self.0, a.0, b.0))
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        NeonQuarter(vdupq_n_f32(v))
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        NeonQuarter(vaddq_f32(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        NeonQuarter(vbslq_f32(vld1q_u32(MASKS[nibble(m, 0)].as_ptr()), b.0, self.0))
    }
    #[inline(always)]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        match nibble(m, 0) {
            0xF => vst1q_f32(p, self.0),
            0 => {}
            n => {
                let mut lanes = [0.0f32; 4];
                vst1q_f32(lanes.as_mut_ptr(), self.0);
                for (l, &x) in lanes.iter().enumerate() {
                    if n >> l & 1 != 0 {
                        *p.wrapping_add(l) = x;
                    }
                }
            }
        }
    }
    type Mask = u16;
    #[inline(always)]
    unsafe fn mask(m: u16) -> u16 {
        m
    }
    #[inline(always)]
    unsafe fn load_under(m: u16, p: *const f32) -> Self {
        <Self as super::Part>::load_masked(m, p)
    }
    #[inline(always)]
    unsafe fn merge_under(self, m: u16, p: *const f32) -> Self {
        if nibble(m, 0) == 0 {
            return self;
        }
        <Self as super::Part>::blend(self, m, <Self as super::Part>::load_masked(m, p))
    }
}

/// Per nibble of a mask, its 4 lanes as NEON's bit select wants them.
static MASKS: [[u32; 4]; 16] = {
    let mut t = [[0u32; 4]; 16];
    let mut m = 0;
    while m < 16 {
        let mut l = 0;
        while l < 4 {
            if m >> l & 1 != 0 {
                t[m][l] = u32::MAX;
            }
            l += 1;
        }
        m += 1;
    }
    t
};

#[inline(always)]
fn nibble(m: u16, i: usize) -> usize {
    ((m >> (4 * i)) & 0xF) as usize
}

impl Lanes16 for Neon {
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
        Neon([vdupq_n_f32(0.0); 4])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Neon([vdupq_n_f32(v); 4])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Neon(std::array::from_fn(|i| vld1q_f32(p.add(4 * i))))
    }
    #[inline(always)]
    unsafe fn load_masked(m: u16, p: *const f32) -> Self {
        Neon(std::array::from_fn(|i| {
            let q = p.wrapping_add(4 * i);
            match nibble(m, i) {
                0xF => vld1q_f32(q),
                0 => vdupq_n_f32(0.0),
                n => {
                    let lanes: [f32; 4] =
                        std::array::from_fn(|l| if n >> l & 1 != 0 { *q.wrapping_add(l) } else { 0.0 });
                    vld1q_f32(lanes.as_ptr())
                }
            }
        }))
    }
    #[inline(always)]
    unsafe fn load_merge(v: Self, m: u16, p: *const f32) -> Self {
        v.blend(m, Self::load_masked(m, p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (i, &v) in self.0.iter().enumerate() {
            vst1q_f32(p.add(4 * i), v);
        }
    }
    #[inline(always)]
    unsafe fn store_masked(self, m: u16, p: *mut f32) {
        for (i, &v) in self.0.iter().enumerate() {
            let q = p.wrapping_add(4 * i);
            match nibble(m, i) {
                0xF => vst1q_f32(q, v),
                0 => {}
                n => {
                    let mut lanes = [0.0f32; 4];
                    vst1q_f32(lanes.as_mut_ptr(), v);
                    for (l, &x) in lanes.iter().enumerate() {
                        if n >> l & 1 != 0 {
                            *q.wrapping_add(l) = x;
                        }
                    }
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Neon(std::array::from_fn(|i| vaddq_f32(self.0[i], b.0[i])))
    }
    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        Neon(std::array::from_fn(|i| vfmaq_f32(self.0[i], a.0[i], b.0[i])))
    }
    #[inline(always)]
    unsafe fn blend(self, m: u16, b: Self) -> Self {
        Neon(std::array::from_fn(|i| vbslq_f32(vld1q_u32(MASKS[nibble(m, i)].as_ptr()), b.0[i], self.0[i])))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Neon(std::array::from_fn(|i| vsubq_f32(self.0[i], b.0[i])))
    }
    #[inline(always)]
    unsafe fn deinterleave(self, b: Self) -> (Self, Self) {
        // Eight quarters of 4 lanes; each pair gives 4 even and 4 odd lanes.
        let q = [self.0[0], self.0[1], self.0[2], self.0[3], b.0[0], b.0[1], b.0[2], b.0[3]];
        (
            Neon(std::array::from_fn(|i| vuzp1q_f32(q[2 * i], q[2 * i + 1]))),
            Neon(std::array::from_fn(|i| vuzp2q_f32(q[2 * i], q[2 * i + 1]))),
        )
    }
    #[inline(always)]
    unsafe fn interleave(self, odd: Self) -> (Self, Self) {
        let q: [float32x4_t; 8] = std::array::from_fn(|i| {
            let (e, o) = (self.0[i / 2], odd.0[i / 2]);
            if i % 2 == 0 {
                vzip1q_f32(e, o)
            } else {
                vzip2q_f32(e, o)
            }
        });
        (Neon([q[0], q[1], q[2], q[3]]), Neon([q[4], q[5], q[6], q[7]]))
    }
}
