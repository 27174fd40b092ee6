//! Weights packed once and kept over many calls.
//!
//! Every forward path packs the weights before its products: the implicit kernel into panels in
//! its order of terms, Winograd into the 16 transformed matrices `U_ξ`, the polyphase and
//! upsample paths into their folded 2x2 kernels, the patch tiles into panels. During training the
//! weights change every step, so packing per call costs nothing extra. A sampling run evaluates
//! the same weights hundreds of times, and at small batches the packing is a large share of a
//! step (keeping them took a batch-1 step of the `mnist` preset from 8.6 to 6.3 ms on `avx2`,
//! docs/cpu.md): [`PackedWeights`] keeps each packing from its first call for the next.
//!
//! Packing only moves values, or adds and halves them in one fixed order, so a kept packing is
//! the same bits as a fresh one and the results do not change.

use std::cell::OnceCell;

use super::Conv2dGeom;
use crate::kernels::packed::PackedA;

/// What a packing depends on besides the weights: `[C_out, C_in, kh, kw, pad_top, pad_left]`.
/// A call whose geometry gives another key packs afresh.
type Key = [usize; 6];

/// The key of a forward convolution of geometry `g`.
pub(super) fn key(g: &Conv2dGeom) -> Key {
    [g.c_out, g.c_in, g.kh, g.kw, g.pad_top, g.pad_left]
}

/// One weight tensor's packings for the forward paths, each made by the first call that needs
/// it and kept for the later ones.
///
/// It belongs to one weight tensor, which must not change while it is kept: a call that passes
/// other weights (another address or length) packs afresh and keeps nothing, but a change made
/// in place cannot be seen. The ops keep one with each frozen value
/// ([`crate::Var::frozen`], the parameters of a sampling run), which cannot change while it lives.
///
/// Memory: about the weights' size per path used (16/9 of it for Winograd's `U_ξ`).
#[derive(Debug, Default)]
pub struct PackedWeights {
    /// The address and length of the weights of the first call.
    source: OnceCell<(usize, usize)>,
    pub(super) implicit: Slot<PackedA>,
    pub(super) winograd: Slot<Vec<PackedA>>,
    pub(super) polyphase: Slot<PackedA>,
    pub(super) upsampled: Slot<Vec<PackedA>>,
    pub(super) tiled: Slot<PackedA>,
}

/// One path's packing and the key it was made for.
pub(super) type Slot<T> = OnceCell<(Key, T)>;

impl PackedWeights {
    /// Nothing packed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many paths' packings are kept.
    pub fn kept(&self) -> usize {
        [self.implicit.get().is_some(), self.winograd.get().is_some(), self.polyphase.get().is_some()]
            .into_iter()
            .chain([self.upsampled.get().is_some(), self.tiled.get().is_some()])
            .filter(|&k| k)
            .count()
    }

    /// Whether `w` are the weights this belongs to (the first call's, by address and length).
    fn holds(&self, w: &[f32]) -> bool {
        let here = (w.as_ptr() as usize, w.len());
        *self.source.get_or_init(|| here) == here
    }
}

/// `run` on the packing of `w` for `key`: the one kept in `slot` of `kept` (made by `make` on
/// first use), or, without a cache, for other weights or for another key, one made for this call.
pub(super) fn with_packed<T, R>(
    kept: Option<&PackedWeights>,
    slot: fn(&PackedWeights) -> &Slot<T>,
    w: &[f32],
    key: Key,
    make: impl FnOnce() -> T,
    run: impl FnOnce(&T) -> R,
) -> R {
    match kept.filter(|k| k.holds(w)).map(slot) {
        Some(cell) if cell.get().is_none_or(|(k, _)| *k == key) => run(&cell.get_or_init(|| (key, make())).1),
        _ => run(&make()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::{conv2d_forward_plus, upsample2x_conv3x3_forward_uninit, ConvPlus};
    use rand::Rng as _;

    fn random_vec(rng: &mut crate::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn geom(
        n: usize,
        c_in: usize,
        c_out: usize,
        hw: usize,
        k: usize,
        stride: usize,
        (pad_top, pad_bottom): (usize, usize),
    ) -> Conv2dGeom {
        let (pad_left, pad_right) = (pad_top, pad_bottom);
        Conv2dGeom {
            n,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kh: k,
            kw: k,
            stride,
            pad_top,
            pad_bottom,
            pad_left,
            pad_right,
        }
    }

    /// The forward convolution with a bias, through `kept` if given.
    fn forward(g: &Conv2dGeom, x: &[f32], w: &[f32], b: &[f32], kept: Option<&PackedWeights>) -> Vec<f32> {
        let mut y = vec![f32::NAN; g.y_len()];
        let plus = ConvPlus { bias: Some(b), ..ConvPlus::default() };
        conv2d_forward_plus(g, x, w, kept, plus, crate::kernels::as_uninit(&mut y));
        y
    }

    /// Every forward path, each packing kept: the second and third calls (new inputs) reuse it,
    /// and every call gives the bits of a call that packs afresh.
    #[test]
    fn kept_packings_give_the_bits_of_fresh_ones_on_every_path() {
        let mut rng = crate::rng_from_seed(7);
        let cases = [
            ("winograd", geom(4, 16, 16, 16, 3, 1, (1, 1))),
            ("implicit 3x3", geom(1, 8, 8, 8, 3, 1, (1, 1))),
            ("implicit 1x1", geom(2, 8, 12, 8, 1, 1, (0, 0))),
            ("polyphase", geom(2, 8, 8, 8, 3, 2, (1, 1))),
            ("polyphase, TensorFlow padding", geom(2, 8, 8, 8, 3, 2, (0, 1))),
            ("patch tiles", geom(2, 4, 8, 9, 3, 1, (0, 0))),
        ];
        for (name, g) in cases {
            let (w, b) = (random_vec(&mut rng, g.w_len()), random_vec(&mut rng, g.c_out));
            let kept = PackedWeights::new();
            for call in 0..3 {
                let x = random_vec(&mut rng, g.x_len());
                let fresh = forward(&g, &x, &w, &b, None);
                assert!(fresh.iter().all(|v| v.is_finite()), "{name}: every output written");
                assert_eq!(bits(&forward(&g, &x, &w, &b, Some(&kept))), bits(&fresh), "{name}, call {call}");
                assert_eq!(kept.kept(), 1, "{name}: one packing kept after call {call}");
            }
        }
    }

    /// The fused upsample-and-convolve path keeps its four phases' packing.
    #[test]
    fn the_upsample_path_keeps_its_phases() {
        let mut rng = crate::rng_from_seed(8);
        let (n, c_in, c_out, h, w) = (2, 8, 12, 4, 4);
        let wt = random_vec(&mut rng, c_out * c_in * 9);
        let kept = PackedWeights::new();
        for call in 0..3 {
            let x = random_vec(&mut rng, n * c_in * h * w);
            let run = |kept: Option<&PackedWeights>| {
                let mut y = vec![f32::NAN; n * c_out * 4 * h * w];
                let y_slots = crate::kernels::as_uninit(&mut y);
                upsample2x_conv3x3_forward_uninit(n, c_in, c_out, (h, w), &x, &wt, kept, None, y_slots);
                y
            };
            let fresh = run(None);
            assert!(fresh.iter().all(|v| v.is_finite()));
            assert_eq!(bits(&run(Some(&kept))), bits(&fresh), "call {call}");
            assert!(kept.upsampled.get().is_some(), "the phases are kept");
        }
    }

    /// A call with other weights, or with a geometry whose packing differs (the polyphase
    /// folding depends on the padding), packs for itself: the results are those of fresh
    /// packings, and the first packing stays kept for its own weights.
    #[test]
    fn other_weights_or_another_padding_pack_afresh() {
        let mut rng = crate::rng_from_seed(9);
        let g = geom(2, 8, 8, 8, 3, 2, (1, 1));
        let g_tf = geom(2, 8, 8, 8, 3, 2, (0, 1));
        let (w, w2, b) = (random_vec(&mut rng, g.w_len()), random_vec(&mut rng, g.w_len()), vec![0.0; 8]);
        let x = random_vec(&mut rng, g.x_len());
        let kept = PackedWeights::new();
        forward(&g, &x, &w, &b, Some(&kept));
        assert_eq!(
            bits(&forward(&g, &x, &w2, &b, Some(&kept))),
            bits(&forward(&g, &x, &w2, &b, None)),
            "other weights"
        );
        let tf = forward(&g_tf, &x, &w, &b, None);
        assert_ne!(bits(&tf), bits(&forward(&g, &x, &w, &b, None)), "the two paddings differ");
        assert_eq!(bits(&forward(&g_tf, &x, &w, &b, Some(&kept))), bits(&tf), "another padding");
        assert_eq!(bits(&forward(&g, &x, &w, &b, Some(&kept))), bits(&forward(&g, &x, &w, &b, None)), "kept");
        assert_eq!(kept.kept(), 1);
    }
}
