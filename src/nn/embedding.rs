//! The sinusoidal timestep embedding of the DDPM U-Net (Ho et al. 2020, Appendix B; the
//! Transformer's position encoding, Vaswani et al. 2017).

use serde::{Deserialize, Serialize};

use crate::Tensor;

/// Which half of the embedding holds the sines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmbeddingOrder {
    /// `[sin, cos]`: Ho et al.'s code and diffusers with `flip_sin_to_cos = False`.
    SinCos,
    /// `[cos, sin]`: diffusers with `flip_sin_to_cos = True`, improved-diffusion.
    CosSin,
}

/// `emb[n] = [sin(t_n f_0), …, sin(t_n f_{h−1}), cos(t_n f_0), …, cos(t_n f_{h−1})]` (or cos
/// first), `h = dim/2`, `f_i = exp(−ln(10000) · i / (h − freq_shift))`. Ho et al. use
/// `freq_shift = 1` (diffusers' `freq_shift=1`; improved-diffusion divides by `h`, i.e. 0).
/// An odd `dim` gets one zero column at the end. Returns `[N, dim]`. The arguments are computed
/// in f64 and rounded once, so large t lose no precision.
///
/// # Panics
/// If `dim < 2`, or `dim/2 == freq_shift` (division by zero).
pub fn timestep_embedding(t: &[f32], dim: usize, order: EmbeddingOrder, freq_shift: f64) -> Tensor {
    assert!(dim >= 2, "timestep_embedding: dim {dim} < 2");
    let half = dim / 2;
    let denom = half as f64 - freq_shift;
    assert!(denom != 0.0, "timestep_embedding: half {half} minus shift {freq_shift} is zero");
    let mut out = Tensor::zeros(vec![t.len(), dim]);
    for (n, &tn) in t.iter().enumerate() {
        for i in 0..half {
            let f = (-(10000f64.ln()) * i as f64 / denom).exp();
            let arg = tn as f64 * f;
            let (s, c) = (arg.sin() as f32, arg.cos() as f32);
            let (first, second) = match order {
                EmbeddingOrder::SinCos => (s, c),
                EmbeddingOrder::CosSin => (c, s),
            };
            out[[n, i]] = first;
            out[[n, half + i]] = second;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_of_zero_is_sines_zero_cosines_one() {
        let e = timestep_embedding(&[0.0], 8, EmbeddingOrder::SinCos, 1.0);
        assert_eq!(e.as_slice().unwrap().to_vec(), vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        let e = timestep_embedding(&[0.0], 8, EmbeddingOrder::CosSin, 1.0);
        assert_eq!(e.as_slice().unwrap().to_vec(), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn frequencies_span_one_to_one_over_ten_thousand() {
        // With freq_shift 1 the last frequency is exactly 1e-4: f_{h−1} = exp(−ln 1e4).
        let t = 1000.0f32;
        let e = timestep_embedding(&[t], 6, EmbeddingOrder::SinCos, 1.0);
        assert!((e[[0, 0]] - t.sin()).abs() < 1e-6);
        assert!((e[[0, 2]] - (t as f64 * 1e-4).sin() as f32).abs() < 1e-6);
        assert!((e[[0, 5]] - (t as f64 * 1e-4).cos() as f32).abs() < 1e-6);
    }

    #[test]
    fn odd_dimension_is_padded_with_a_zero() {
        let e = timestep_embedding(&[3.0], 5, EmbeddingOrder::SinCos, 1.0);
        assert_eq!(e.shape(), &[1, 5]);
        assert_eq!(e[[0, 4]], 0.0);
    }
}
