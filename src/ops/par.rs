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
