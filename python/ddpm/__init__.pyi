from os import PathLike
from typing import Any, Dict, Optional, Sequence, Union

import numpy.typing as npt

from . import testing as testing
from ._ddpm import Model as Model
from ._ddpm import Oracle as Oracle
from ._ddpm import Schedule as Schedule
from ._ddpm import __version__ as __version__
from ._ddpm import load as load
from ._ddpm import sample as sample
from ._ddpm import vectors as vectors

def compare(
    reference: Union[Dict[str, npt.ArrayLike], str, "PathLike[str]"],
    candidate: Union[Dict[str, npt.ArrayLike], str, "PathLike[str]"],
    rtol: float = 1e-5,
    atol: float = 1e-8,
    only: Optional[Sequence[str]] = None,
) -> Dict[str, Any]: ...
