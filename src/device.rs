//! Which processor runs the large matrix products: the CPU (the default, always available) or a
//! GPU through wgpu compute shaders (cargo feature `wgpu`, see docs/gpu.md).
//!
//! The choice is process-wide: [`select`] sets it once at start-up (the `ddpm` binary does so
//! from `--device` or `DDPM_DEVICE`) and every kernel reads it. One dispatch point decides
//! what is offloaded: [`offload`] says whether a product of `m·k·n` multiply-adds goes to the
//! GPU. It is consulted by [`crate::kernels::sgemm`], [`crate::kernels::sgemm_batched`], the three
//! convolution kernels of [`crate::kernels::conv`] and the matmul / bmm / linear ops; with the
//! CPU selected (or the feature off) they run exactly the code they ran before, bit for bit.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::{Error, Result};

/// The environment variable the binary reads when `--device` is not given (`cpu`, `gpu` or
/// `auto`).
pub const DEVICE_ENV: &str = "DDPM_DEVICE";

/// The environment variable that overrides [`DEFAULT_GPU_MIN_MACS`], read by [`select`].
pub const GPU_MIN_MACS_ENV: &str = "DDPM_GPU_MIN_MACS";

/// Products with fewer multiply-adds than this stay on the CPU even when the GPU is selected:
/// below about 4 M multiply-adds (≈ 50 µs on two CPU cores) the upload, the dispatch and the
/// read-back cost more than the product itself.
pub const DEFAULT_GPU_MIN_MACS: usize = 1 << 22;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU kernels only.
    Cpu,
    /// The GPU; an error if there is none (or the binary was built without the `wgpu` feature).
    Gpu,
    /// A hardware GPU if there is one, else the CPU with a one-line notice. A software Vulkan
    /// driver (lavapipe, SwiftShader) does not count: it is slower than the CPU kernels.
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(Error::config("device", format!("{other:?} is not one of cpu, gpu, auto"))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Gpu => "gpu",
            DeviceChoice::Auto => "auto",
        })
    }
}

/// The processor the large products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU kernels.
    Cpu,
    /// wgpu compute shaders on the adapter named in [`Selected::adapter`].
    Gpu,
}

/// The outcome of [`select`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    /// The device now in use.
    pub device: Device,
    /// The GPU adapter in use (`name (backend, type)`), when the device is the GPU.
    pub adapter: Option<String>,
    /// Why `auto` fell back to the CPU, as one line for the user.
    pub notice: Option<String>,
}

const CPU: u8 = 0;
const GPU: u8 = 1;

static CURRENT: AtomicU8 = AtomicU8::new(CPU);
static GPU_MIN_MACS: AtomicUsize = AtomicUsize::new(DEFAULT_GPU_MIN_MACS);

/// Selects the device for the rest of the process (it can be selected again, e.g. by tests that
/// compare the two).
///
/// `Gpu` and `Auto` initialise the GPU context (adapter, device, pipelines) here, so a missing
/// driver is reported now rather than at the first product. They also read
/// [`GPU_MIN_MACS_ENV`] when it is set.
///
/// # Errors
/// [`Error::GpuUnavailable`] for `Gpu` when no adapter is found or the binary was built without
/// the `wgpu` feature; [`Error::InvalidConfig`] when [`GPU_MIN_MACS_ENV`] is not a number.
pub fn select(choice: DeviceChoice) -> Result<Selected> {
    if choice != DeviceChoice::Cpu {
        if let Ok(v) = std::env::var(GPU_MIN_MACS_ENV) {
            let macs = v.trim().parse::<usize>().map_err(|e| {
                Error::config("DDPM_GPU_MIN_MACS", format!("{v:?} is not a number of multiply-adds: {e}"))
            })?;
            set_gpu_min_macs(macs);
        }
    }
    let selected = match choice {
        DeviceChoice::Cpu => Selected { device: Device::Cpu, adapter: None, notice: None },
        DeviceChoice::Gpu => {
            let adapter = gpu_adapter(true).map_err(|reason| Error::GpuUnavailable { reason })?;
            Selected { device: Device::Gpu, adapter: Some(adapter), notice: None }
        }
        DeviceChoice::Auto => match gpu_adapter(false) {
            Ok(adapter) => Selected { device: Device::Gpu, adapter: Some(adapter), notice: None },
            Err(reason) => Selected {
                device: Device::Cpu,
                adapter: None,
                notice: Some(format!("--device auto: no usable GPU ({reason}), running on the CPU")),
            },
        },
    };
    CURRENT.store(if selected.device == Device::Gpu { GPU } else { CPU }, Ordering::Relaxed);
    Ok(selected)
}

/// The device selected last (the CPU until [`select`] chooses otherwise).
pub fn current() -> Device {
    if CURRENT.load(Ordering::Relaxed) == GPU {
        Device::Gpu
    } else {
        Device::Cpu
    }
}

/// Sets the size below which products stay on the CPU (see [`DEFAULT_GPU_MIN_MACS`]); 0 sends
/// every product to the GPU, which the tests use to exercise the shaders on small shapes.
pub fn set_gpu_min_macs(macs: usize) {
    GPU_MIN_MACS.store(macs, Ordering::Relaxed);
}

/// The size below which products stay on the CPU.
pub fn gpu_min_macs() -> usize {
    GPU_MIN_MACS.load(Ordering::Relaxed)
}

/// Number of products and convolutions the GPU has run in this process (0 without the `wgpu`
/// feature).
pub fn gpu_calls() -> u64 {
    #[cfg(feature = "wgpu")]
    return crate::gpu::calls();
    #[cfg(not(feature = "wgpu"))]
    0
}

/// The one dispatch point: whether a product of `macs` multiply-adds runs on the GPU. Always
/// false without the `wgpu` feature.
#[inline]
pub fn offload(macs: usize) -> bool {
    cfg!(feature = "wgpu") && current() == Device::Gpu && macs > 0 && macs >= gpu_min_macs()
}

/// Initialises the GPU and describes its adapter; `allow_software` admits a CPU adapter. The
/// error is the reason there is no usable GPU.
#[cfg(feature = "wgpu")]
fn gpu_adapter(allow_software: bool) -> Result<String, String> {
    let info = crate::gpu::init()?;
    if !allow_software && info.software {
        return Err(format!(
            "the only adapter is {info}, a software renderer slower than the CPU kernels; \
             --device gpu runs on it anyway"
        ));
    }
    Ok(info.to_string())
}

#[cfg(not(feature = "wgpu"))]
fn gpu_adapter(_allow_software: bool) -> Result<String, String> {
    Err("this binary was built without the `wgpu` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses_its_three_names_in_any_case() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(" GPU ".parse::<DeviceChoice>().unwrap(), DeviceChoice::Gpu);
        assert_eq!("Auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        let err = "cuda".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("cpu, gpu, auto"), "{err}");
        for c in [DeviceChoice::Cpu, DeviceChoice::Gpu, DeviceChoice::Auto] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
    }

    #[test]
    fn the_cpu_is_the_default_and_offloads_nothing() {
        assert_eq!(current(), Device::Cpu);
        assert!(!offload(usize::MAX));
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn gpu_without_the_feature_is_an_error_that_says_how_to_get_one() {
        let err = select(DeviceChoice::Gpu).unwrap_err().to_string();
        assert!(err.contains("--features wgpu"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
        let auto = select(DeviceChoice::Auto).unwrap();
        assert_eq!(auto.device, Device::Cpu);
        assert!(auto.notice.unwrap().contains("without the `wgpu` feature"));
        assert_eq!(current(), Device::Cpu);
    }
}
