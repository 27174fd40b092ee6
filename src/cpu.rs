//! The instruction set the hand-written kernels use: the best this machine has, or a lower one
//! asked for with `DDPM_CPU=avx512|avx2|neon|scalar` (or `ddpm bench --cpu`), as oneDNN's
//! `ONEDNN_MAX_CPU_ISA` and PyTorch's `ATEN_CPU_CAPABILITY` do, so that every path can be run,
//! tested and timed on one machine.
//!
//! Every level runs the same kernels, written once over 16 lanes (`kernels/lanes/`): the
//! packed micro-kernel, the implicit and polyphase convolutions and their weight gradient on
//! the level's registers (`avx512`: one AVX-512 register per 16 lanes; `avx2`: two AVX2+FMA;
//! `neon`: four NEON, on aarch64; `scalar`: a loop per lane), and the element-wise kernels
//! (softmax, exp, group norm + SiLU) compiled for the level. All sum in one order, so all give
//! the same bits (docs/cpu.md). The `gemm` crate, which does the remaining products (linear
//! layers, the attention gradient, strided and 1x1 weight gradients), picks its own instruction
//! set from the machine and is not capped by this setting; it gives the same bits under every
//! level on one machine.

use std::str::FromStr;
use std::sync::OnceLock;

use crate::{Error, Result};

/// An instruction-set level, ordered from the lowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The baseline target (SSE2 on x86-64, the target's own on others).
    Scalar,
    /// aarch64 NEON (part of that architecture's baseline).
    Neon,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512 (F, VL, DQ).
    Avx512,
}

impl Isa {
    /// Every level, lowest first (of either architecture: see [`Isa::runs_here`]).
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512];

    /// The name `DDPM_CPU` and `ddpm bench --json` use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this machine runs the level: `scalar` everywhere, `neon` on aarch64, `avx2` and
    /// `avx512` on x86-64 machines that have them.
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            Isa::Avx2 | Isa::Avx512 => cfg!(target_arch = "x86_64") && self <= Isa::detected(),
        }
    }

    /// The levels this machine runs, lowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.runs_here()).collect()
    }

    /// The best level this machine runs.
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512vl") && has!("avx512dq") {
                    return Isa::Avx512;
                }
                if has!("avx2") && has!("fma") {
                    return Isa::Avx2;
                }
            }
            if cfg!(target_arch = "aarch64") {
                return Isa::Neon;
            }
            Isa::Scalar
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = Error;

    fn from_str(s: &str) -> Result<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" | "avx512f" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "neon" | "asimd" => Ok(Isa::Neon),
            "scalar" | "none" | "default" => Ok(Isa::Scalar),
            other => Err(Error::config(
                "DDPM_CPU",
                format!(
                    "{other:?} is not an instruction set ddpm has kernels for; use avx512, avx2, neon or scalar"
                ),
            )),
        }
    }
}

/// The level asked for by `DDPM_CPU`, if set.
///
/// # Errors
/// [`Error::InvalidConfig`] for an unknown name, or a level above what this machine runs.
pub fn setting() -> Result<Option<Isa>> {
    let Some(v) = std::env::var_os("DDPM_CPU") else { return Ok(None) };
    let isa: Isa = v.to_str().unwrap_or("?").parse()?;
    check_runs(isa, "DDPM_CPU")?;
    Ok(Some(isa))
}

fn check_runs(isa: Isa, field: &'static str) -> Result<()> {
    let best = Isa::detected();
    if !isa.runs_here() {
        return Err(Error::config(
            field,
            format!(
                "this machine cannot run {isa}: it runs {}; ask for one of those (best: {best})",
                Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(())
}

static ACTIVE: OnceLock<Isa> = OnceLock::new();

/// The level the kernels use: `DDPM_CPU` if set and valid, else [`Isa::detected`]. Fixed at the
/// first call. (An invalid `DDPM_CPU` is ignored here; the `ddpm` binary refuses it at start
/// with [`setting`].)
pub fn active() -> Isa {
    *ACTIVE.get_or_init(|| setting().ok().flatten().unwrap_or_else(Isa::detected))
}

/// Fixes the level before any kernel has run (`ddpm bench --cpu`).
///
/// # Errors
/// [`Error::InvalidConfig`] if the machine cannot run `isa`, or the level was already fixed to
/// another one.
pub fn force(isa: Isa) -> Result<()> {
    check_runs(isa, "--cpu")?;
    let now = *ACTIVE.get_or_init(|| isa);
    if now != isa {
        return Err(Error::config(
            "--cpu",
            format!("the kernels already run {now}; set the level before any work"),
        ));
    }
    Ok(())
}

/// Defines a function whose body is compiled three times (for AVX-512, for AVX2+FMA and for the
/// baseline target) and runs the version of [`active`]. The body must give the same bits under
/// every version: with no fast-math in Rust, that holds for code that fixes its own order of
/// sums (the kernels here sum in 16 lanes added in a fixed tree).
macro_rules! isa_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
            match $crate::cpu::active() {
                // SAFETY: `active` is never above what the machine runs (`Isa::detected`).
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::Isa::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    };
}
pub(crate) use isa_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_levels_are_ordered() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        let e = "sse9".parse::<Isa>().unwrap_err().to_string();
        assert!(e.contains("DDPM_CPU") && e.contains("avx2"), "{e}");
        assert!(active() <= Isa::detected());
    }
}
