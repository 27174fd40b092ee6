//! Group normalisation (Wu & He 2018), optionally followed by SiLU, forward and backward, over
//! `[N, C, spatial]` row-major `f32`. One (sample, group) chunk is `C/groups · spatial`
//! contiguous values; chunks run in parallel, each on one thread, so the result does not depend
//! on the number of threads.
//!
//! Statistics and parameter-gradient sums are accumulated in f64 (in 8 fixed lanes, see
//! [`sum_f64_lanes`]); the per-element work is in f32. The chunk loops are compiled for AVX-512,
//! AVX2 and the baseline, chosen at run time ([`crate::cpu::active`], `DDPM_CPU`); they use no
//! `mul_add`, so every version returns the same bits.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::as_uninit;
use super::math::{sigmoid, sum_f64_lanes};

/// Sizes of a group norm: input `[n, c, spatial]`, `groups` dividing `c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupNormGeom {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Product of the spatial sizes.
    pub spatial: usize,
    /// Number of channel groups.
    pub groups: usize,
}

impl GroupNormGeom {
    fn validate(&self) {
        assert!(
            self.groups > 0 && self.c.is_multiple_of(self.groups),
            "group norm: {} groups do not divide {} channels",
            self.groups,
            self.c
        );
    }

    fn cpg(&self) -> usize {
        self.c / self.groups
    }

    fn chunk(&self) -> usize {
        self.cpg() * self.spatial
    }

    fn len(&self) -> usize {
        self.n * self.c * self.spatial
    }
}

/// `y = act(γ_c·x̂ + β_c)` with `x̂ = (x − μ_{n,g})/√(σ²_{n,g} + eps)` (biased variance), `act`
/// SiLU when `silu`, else the identity. Writes `inv_std[n·groups + g] = 1/√(σ² + eps)` and,
/// when given, `x_hat` (both needed by [`group_norm_backward`]).
///
/// # Panics
/// If `groups` does not divide `c` or a slice length does not match `geom`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward(
    geom: &GroupNormGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
    y: &mut [f32],
    x_hat: Option<&mut [f32]>,
    inv_std: &mut [f32],
) {
    group_norm_forward_uninit(geom, x, gamma, beta, eps, silu, as_uninit(y), x_hat.map(as_uninit), inv_std);
}

/// [`group_norm_forward`] into memory that need not be initialised (a fresh `Vec`'s spare
/// capacity): on return every element of `y` (and `x_hat`) is written, so the buffers need
/// not be zeroed first, which would cost one more pass over memory.
///
/// # Panics
/// As [`group_norm_forward`].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward_uninit(
    geom: &GroupNormGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
    y: &mut [MaybeUninit<f32>],
    x_hat: Option<&mut [MaybeUninit<f32>]>,
    inv_std: &mut [f32],
) {
    geom.validate();
    let (len, chunk, cpg, groups) = (geom.len(), geom.chunk(), geom.cpg(), geom.groups);
    assert!(x.len() == len && y.len() == len, "group_norm_forward: x/y lengths do not match {geom:?}");
    assert!(gamma.len() == geom.c && beta.len() == geom.c, "group_norm_forward: gamma/beta are not [C]");
    assert_eq!(inv_std.len(), geom.n * groups, "group_norm_forward: inv_std is not [N·groups]");
    if chunk == 0 {
        inv_std.fill(0.0);
        return;
    }
    let sp = geom.spatial;
    let params = |k: usize| {
        let c0 = (k % groups) * cpg;
        (&gamma[c0..c0 + cpg], &beta[c0..c0 + cpg])
    };
    match x_hat {
        Some(x_hat) => {
            assert_eq!(x_hat.len(), len, "group_norm_forward: x_hat length does not match {geom:?}");
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .zip(x_hat.par_chunks_mut(chunk))
                .zip(inv_std.par_iter_mut())
                .enumerate()
                .for_each(|(k, (((out, inp), xh), inv))| {
                    let (g, b) = params(k);
                    *inv = forward_chunk(inp, g, b, sp, eps, silu, out, xh);
                });
        }
        None => {
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .zip(inv_std.par_iter_mut())
                .enumerate()
                .for_each(|(k, ((out, inp), inv))| {
                    let (g, b) = params(k);
                    *inv = forward_chunk(inp, g, b, sp, eps, silu, out, &mut []);
                });
        }
    }
}

crate::cpu::isa_dispatch! {
/// One (sample, group): statistics, then `y` (and `x̂` unless `xh` is empty). Returns 1/σ.
#[allow(clippy::too_many_arguments)]
fn forward_chunk(
    inp: &[f32],
    gamma: &[f32],
    beta: &[f32],
    spatial: usize,
    eps: f32,
    silu: bool,
    out: &mut [MaybeUninit<f32>],
    xh: &mut [MaybeUninit<f32>],
) -> f32 {
    let m = inp.len() as f64;
    // Two passes for an accurate variance.
    let mean = sum_f64_lanes(inp, |v| v as f64) / m;
    let var = sum_f64_lanes(inp, |v| {
        let d = v as f64 - mean;
        d * d
    }) / m;
    let is = (1.0 / (var + eps as f64).sqrt()) as f32;
    let mean = mean as f32;
    for (j, (&gc, &bc)) in gamma.iter().zip(beta).enumerate() {
        let r = j * spatial..(j + 1) * spatial;
        let (o, x) = (&mut out[r.clone()], &inp[r]);
        if silu {
            for (o, &v) in o.iter_mut().zip(x) {
                let z = gc * ((v - mean) * is) + bc;
                o.write(z * sigmoid(z));
            }
        } else {
            for (o, &v) in o.iter_mut().zip(x) {
                o.write(gc * ((v - mean) * is) + bc);
            }
        }
    }
    if !xh.is_empty() {
        for (h, &v) in xh.iter_mut().zip(inp) {
            h.write((v - mean) * is);
        }
    }
    is
}
}

/// Gradients of [`group_norm_forward`] from the upstream gradient `g` (same shape as `y`), its
/// saved `x_hat` and `inv_std`: writes `dx` and returns nothing else when `dgamma`/`dbeta` are
/// not wanted. `dgamma[c] = Σ_{n,s} dz·x̂`, `dbeta[c] = Σ_{n,s} dz` with `dz = g·act'(z)`,
/// summed per chunk in f64 and then over the batch in sample order; and
/// `dx = (1/σ)(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` per chunk with `dx̂ = γ·dz`.
///
/// # Panics
/// If `groups` does not divide `c` or a slice length does not match `geom`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    geom: &GroupNormGeom,
    g: &[f32],
    x_hat: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    geom.validate();
    let (len, chunk, cpg, groups, c) = (geom.len(), geom.chunk(), geom.cpg(), geom.groups, geom.c);
    assert!(
        g.len() == len && x_hat.len() == len && dx.len() == len,
        "group_norm_backward: g/x_hat/dx lengths do not match {geom:?}"
    );
    assert!(gamma.len() == c && beta.len() == c, "group_norm_backward: gamma/beta are not [C]");
    assert!(dgamma.len() == c && dbeta.len() == c, "group_norm_backward: dgamma/dbeta are not [C]");
    assert_eq!(inv_std.len(), geom.n * groups, "group_norm_backward: inv_std is not [N·groups]");
    if chunk == 0 {
        dx.fill(0.0);
        dgamma.fill(0.0);
        dbeta.fill(0.0);
        return;
    }
    let sp = geom.spatial;
    // Per chunk: (dγ, dβ) for each of its channels, summed over the batch below in order.
    let mut partial = vec![0.0f64; 2 * geom.n * c];
    dx.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk))
        .zip(x_hat.par_chunks(chunk))
        .zip(inv_std.par_iter())
        .zip(partial.par_chunks_mut(2 * cpg))
        .enumerate()
        .for_each(|(k, ((((d, gk), xh), &is), part))| {
            let c0 = (k % groups) * cpg;
            backward_chunk(gk, xh, &gamma[c0..c0 + cpg], &beta[c0..c0 + cpg], sp, is, silu, d, part);
        });
    for ch in 0..c {
        let (mut dg, mut db) = (0.0f64, 0.0f64);
        for s in 0..geom.n {
            dg += partial[2 * (s * c + ch)];
            db += partial[2 * (s * c + ch) + 1];
        }
        dgamma[ch] = dg as f32;
        dbeta[ch] = db as f32;
    }
}

crate::cpu::isa_dispatch! {
#[allow(clippy::too_many_arguments)]
fn backward_chunk(
    g: &[f32],
    xh: &[f32],
    gamma: &[f32],
    beta: &[f32],
    spatial: usize,
    is: f32,
    silu: bool,
    d: &mut [f32],
    part: &mut [f64],
) {
    let (mut sum_d, mut sum_dx) = (0.0f64, 0.0f64);
    for (j, (&gc, &bc)) in gamma.iter().zip(beta).enumerate() {
        let r = j * spatial..(j + 1) * spatial;
        let (dj, gj, hj) = (&mut d[r.clone()], &g[r.clone()], &xh[r]);
        // dz = g·act'(z), z = γ x̂ + β; kept in `d` as dx̂ = γ·dz for the last pass.
        if silu {
            for ((d, &gv), &h) in dj.iter_mut().zip(gj).zip(hj) {
                let z = gc * h + bc;
                let s = sigmoid(z);
                *d = gv * (s * (1.0 + z * (1.0 - s)));
            }
        } else {
            dj.copy_from_slice(gj);
        }
        let (mut dg, mut db) = ([0.0f64; 8], [0.0f64; 8]);
        let (dc, hc) = (dj.chunks_exact(8), hj.chunks_exact(8));
        let (d_rest, h_rest) = (dc.remainder(), hc.remainder());
        for (d8, h8) in dc.zip(hc) {
            for lane in 0..8 {
                dg[lane] += (d8[lane] * h8[lane]) as f64;
                db[lane] += d8[lane] as f64;
            }
        }
        for (lane, (&dz, &h)) in d_rest.iter().zip(h_rest).enumerate() {
            dg[lane] += (dz * h) as f64;
            db[lane] += dz as f64;
        }
        for d in dj.iter_mut() {
            *d *= gc;
        }
        let (dg, db): (f64, f64) = (dg.iter().sum(), db.iter().sum());
        part[2 * j] = dg;
        part[2 * j + 1] = db;
        sum_d += gc as f64 * db;
        sum_dx += gc as f64 * dg;
    }
    let m = d.len() as f64;
    let (mean_d, mean_dx) = ((sum_d / m) as f32, (sum_dx / m) as f32);
    for (v, &h) in d.iter_mut().zip(xh) {
        *v = is * (*v - mean_d - h * mean_dx);
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Into NaN-filled buffers, the unzeroed entry point writes every element of `y` and `x̂`,
    /// with the values of the zeroed one; and `x̂` has zero mean and unit variance per group.
    #[test]
    fn uninit_entry_point_writes_every_element() {
        let geom = GroupNormGeom { n: 3, c: 6, spatial: 13, groups: 2 };
        let x: Vec<f32> = (0..geom.len()).map(|i| ((i * 37) % 23) as f32 * 0.3 - 2.0).collect();
        let gamma: Vec<f32> = (0..6).map(|i| 0.5 + i as f32 * 0.25).collect();
        let beta: Vec<f32> = (0..6).map(|i| i as f32 * 0.1 - 0.2).collect();
        for silu in [false, true] {
            let (mut y, mut xh, mut inv) = (vec![0.0; geom.len()], vec![0.0; geom.len()], vec![0.0; 6]);
            group_norm_forward(&geom, &x, &gamma, &beta, 1e-5, silu, &mut y, Some(&mut xh), &mut inv);
            let nan = || vec![MaybeUninit::new(f32::NAN); geom.len()];
            let (mut y_u, mut xh_u, mut inv_u) = (nan(), nan(), vec![0.0; 6]);
            group_norm_forward_uninit(
                &geom,
                &x,
                &gamma,
                &beta,
                1e-5,
                silu,
                &mut y_u,
                Some(&mut xh_u),
                &mut inv_u,
            );
            // SAFETY: filled with NaN before the call, so initialised whatever the kernel did.
            let read = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
                v.iter().map(|s| unsafe { s.assume_init() }.to_bits()).collect()
            };
            let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|s| s.to_bits()).collect() };
            assert_eq!(read(&y_u), bits(&y), "y, silu {silu}");
            assert_eq!(read(&xh_u), bits(&xh), "x_hat, silu {silu}");
            for chunk in xh.chunks(geom.chunk()) {
                let m = chunk.len() as f64;
                let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / m;
                let var = chunk.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / m;
                assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-3, "x_hat mean {mean}, variance {var}");
            }
        }
    }
}
