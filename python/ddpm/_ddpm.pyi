"""Type stubs of ddpm's native module (see ddpm/__init__.py and docs/python.md)."""

from os import PathLike
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike
F64 = npt.NDArray[np.float64]
Model_ = Callable[[F64, np.ndarray], ArrayLike]
Path_ = Union[str, "PathLike[str]"]

__version__: str

class Schedule:
    """β and every table derived from it, with improved-diffusion's names and methods."""

    def __init__(
        self,
        kind: str = "linear",
        timesteps: Optional[int] = None,
        convention: str = "ho2020",
        betas: Optional[ArrayLike] = None,
    ) -> None: ...
    @property
    def num_timesteps(self) -> int: ...
    @property
    def convention(self) -> str: ...
    @property
    def betas(self) -> F64: ...
    @property
    def alphas(self) -> F64: ...
    @property
    def alphas_cumprod(self) -> F64: ...
    @property
    def alphas_cumprod_prev(self) -> F64: ...
    @property
    def sqrt_alphas_cumprod(self) -> F64: ...
    @property
    def sqrt_one_minus_alphas_cumprod(self) -> F64: ...
    @property
    def log_one_minus_alphas_cumprod(self) -> F64: ...
    @property
    def sqrt_recip_alphas_cumprod(self) -> F64: ...
    @property
    def sqrt_recipm1_alphas_cumprod(self) -> F64: ...
    @property
    def posterior_variance(self) -> F64: ...
    @property
    def posterior_log_variance_clipped(self) -> F64: ...
    @property
    def posterior_mean_coef1(self) -> F64: ...
    @property
    def posterior_mean_coef2(self) -> F64: ...
    @property
    def log_betas(self) -> F64: ...
    @property
    def fixed_large_log_variance(self) -> F64: ...
    def tables(self) -> Dict[str, F64]: ...
    def model_timesteps(self, t: ArrayLike) -> F64: ...
    def q_sample(self, x_start: ArrayLike, t: ArrayLike, noise: ArrayLike) -> F64: ...
    def q_posterior_mean_variance(self, x_start: ArrayLike, x_t: ArrayLike, t: ArrayLike) -> Tuple[F64, F64, F64]: ...
    def p_mean_variance(
        self,
        model_output: ArrayLike,
        x_t: ArrayLike,
        t: ArrayLike,
        mean_type: str = "eps",
        var_type: str = "fixedlarge",
        clip_denoised: bool = True,
    ) -> Dict[str, F64]: ...
    def vb_terms_bpd(
        self,
        model_output: ArrayLike,
        x_start: ArrayLike,
        x_t: ArrayLike,
        t: ArrayLike,
        mean_type: str = "eps",
        var_type: str = "fixedlarge",
        clip_denoised: bool = True,
    ) -> Dict[str, F64]: ...
    def prior_bpd(self, x_start: ArrayLike) -> F64: ...
    def calc_bpd_loop(
        self,
        model: Model_,
        x_start: ArrayLike,
        mean_type: str = "eps",
        var_type: str = "fixedlarge",
        clip_denoised: bool = True,
        seed: int = 0,
    ) -> Dict[str, F64]: ...

class Model:
    """A network loaded by ``ddpm.load``; call it as ``model(x_t, t)``."""

    def predict(self, x: ArrayLike, t: ArrayLike, y: Optional[ArrayLike] = None) -> F64: ...
    def __call__(self, x: ArrayLike, t: ArrayLike, y: Optional[ArrayLike] = None) -> F64: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def mean_type(self) -> str: ...
    @property
    def var_type(self) -> str: ...
    def schedule(self) -> Schedule: ...

def sample(
    model: Model_,
    shape: Sequence[int],
    schedule: Schedule,
    sampler: str = "ancestral",
    steps: Optional[int] = None,
    eta: float = 0.0,
    seed: int = 0,
    trace: bool = False,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    clip_denoised: bool = True,
    karras: bool = False,
    spacing: str = "linspace",
) -> Union[F64, Dict[str, F64]]: ...
def vectors(
    kind: str = "linear",
    timesteps: int = 1000,
    convention: str = "ho2020",
    seed: int = 0,
    batch: int = 8,
    sample_shape: Tuple[int, int, int] = (3, 4, 4),
    path: Optional[Path_] = None,
) -> Dict[str, np.ndarray]: ...
def compare_arrays(
    reference: Union[Dict[str, ArrayLike], Path_],
    candidate: Union[Dict[str, ArrayLike], Path_],
    rtol: float = 1e-5,
    atol: float = 1e-8,
    only: Optional[Sequence[str]] = None,
) -> Dict[str, Any]: ...
def load(
    path: Path_, no_ema: bool = False, flags: Optional[str] = None, family: str = "improved-diffusion"
) -> Model: ...

class Oracle:
    """The exact denoiser E[ε | x_t] of a finite data set ``images`` [K, ...]."""

    def __init__(self, images: ArrayLike) -> None: ...
    def eps(self, schedule: Schedule, x_t: ArrayLike, t: ArrayLike) -> F64: ...
