//! Elementwise maps that run on the rayon pool when the array is large enough to pay for it.
//! Every element is computed independently, so results do not depend on the thread count.

use ndarray::Zip;

use crate::Tensor;

/// Below this many elements a map runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// `f` applied to every element of `x`.
pub(crate) fn map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync + Send) -> Tensor {
    let z = Zip::from(x);
    if x.len() >= PAR_MIN {
        z.par_map_collect(|&a| f(a))
    } else {
        z.map_collect(|&a| f(a))
    }
}

/// `f(a, b)` elementwise over two same-shaped arrays.
pub(crate) fn map2(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Tensor {
    let z = Zip::from(a).and(b);
    if a.len() >= PAR_MIN {
        z.par_map_collect(|&a, &b| f(a, b))
    } else {
        z.map_collect(|&a, &b| f(a, b))
    }
}

/// `f(a, b, c)` elementwise over three same-shaped arrays.
pub(crate) fn map3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> Tensor {
    let z = Zip::from(a).and(b).and(c);
    if a.len() >= PAR_MIN {
        z.par_map_collect(|&a, &b, &c| f(a, b, c))
    } else {
        z.map_collect(|&a, &b, &c| f(a, b, c))
    }
}

/// Elements per task of [`zeroed`] and [`copied`].
pub(crate) const FILL_CHUNK: usize = 1 << 14;

/// `len` zeros, written in parallel when `len` is large.
///
/// A large output buffer that a parallel kernel then overwrites would otherwise be zeroed by one
/// `memset` on the calling thread while the pool's workers wait.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    // SAFETY: write_with covers each whole chunk.
    unsafe {
        filled_uninit(len, FILL_CHUNK, |_, part| {
            write_with(part, |_| 0.0);
        })
    }
}

/// A copy of `src`, made in parallel when it is large.
pub(crate) fn copied(src: &[f32]) -> Vec<f32> {
    // SAFETY: write_from covers each whole chunk.
    unsafe {
        filled_uninit(src.len(), FILL_CHUNK, |i, out| {
            let n = out.len();
            write_from(out, &src[i * FILL_CHUNK..][..n]);
        })
    }
}

/// A vector of `len` values written by `init` into fresh, unzeroed memory.
///
/// # Safety
/// `init` must write every element of the slice it is given (the kernels' `*_uninit` entry
/// points promise this).
pub(crate) unsafe fn written_by(
    len: usize,
    init: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    init(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller promises `init` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A vector of `len` values whose chunk `i` (`chunk` long, the last one shorter) is written by
/// `f(i, chunk)`, the chunks in parallel when `len ≥ PAR_MIN`, each by the task that owns it, so
/// the memory is touched once, on the core that writes it, and never zeroed first. `f` must
/// write every element of its chunk (with [`write_from`] / [`write_with`], which cover a whole
/// slice).
///
/// # Safety
/// `f` must initialise every element of every chunk it is given.
pub(crate) unsafe fn filled_uninit(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    if len >= PAR_MIN {
        spare.par_chunks_mut(chunk).enumerate().for_each(|(i, part)| f(i, part));
    } else {
        spare.chunks_mut(chunk).enumerate().for_each(|(i, part)| f(i, part));
    }
    // SAFETY: the caller promises `f` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// Copies `src` into `dst` (the same length) and returns `dst` as initialised values.
pub(crate) fn write_from<'a>(dst: &'a mut [std::mem::MaybeUninit<f32>], src: &[f32]) -> &'a mut [f32] {
    assert_eq!(dst.len(), src.len(), "write_from: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
    // SAFETY: every element was written just above; same layout.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Writes `value(j)` into element `j` of `dst` and returns `dst` as initialised values.
pub(crate) fn write_with(
    dst: &mut [std::mem::MaybeUninit<f32>],
    mut value: impl FnMut(usize) -> f32,
) -> &mut [f32] {
    for (j, d) in dst.iter_mut().enumerate() {
        d.write(value(j));
    }
    // SAFETY: every element was written just above; same layout.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}
