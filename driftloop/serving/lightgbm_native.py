"""LightGBM's single-row fast path through its public C API, the one place that touches it.

``Booster.predict`` spends ~80 us on one row (argument checks, a new predictor per call);
``LGBM_BoosterPredictForMatSingleRowFast`` answers the same row in a few us. The Python package
exposes that path only through private names (``_LIB``, ``_safe_call``, a booster's
``_handle``), so this adapter binds the C API itself (``c_api.h``, LightGBM's stable public
interface):

- the shared library is the one the ``lightgbm`` package ships and has already loaded;
- the adapter owns its own booster handle, loaded from the model's text
  (``Booster.model_to_string``, public), and frees it with the prediction config;
- its constants are the C API's own values.

``SUPPORTED_VERSIONS`` is the range this binding is tested on (``pyproject.toml`` pins the same
range). ``tests/unit/test_lightgbm_native.py`` fails on a version outside it, and checks that
the fast path and ``Booster.predict`` agree. An upgrade therefore fails loudly in CI, never
quietly in production.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Final

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

SUPPORTED_VERSIONS: Final = ((4, 6), (5, 0))
"""LightGBM versions this binding is tested on: at least the first, below the second."""

# c_api.h
_C_API_DTYPE_FLOAT64: Final = 1
_C_API_PREDICT_NORMAL: Final = 0


class NativeLightGBMError(RuntimeError):
    """The C API refused a call; the message is LightGBM's own."""


def version_supported(version: str = lgb.__version__) -> bool:
    """Whether ``version`` lies in ``SUPPORTED_VERSIONS``."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    low, high = SUPPORTED_VERSIONS
    return low <= major_minor < high


def _library_path() -> Path:
    suffix = {"darwin": "dylib", "win32": "dll"}.get(sys.platform, "so")
    package = Path(lgb.__file__).resolve().parent
    for folder in (package / "lib", package / "bin", package.parent):
        candidate = folder / f"lib_lightgbm.{suffix}"
        if candidate.is_file():
            return candidate
    raise NativeLightGBMError(
        f"lib_lightgbm.{suffix} is not where lightgbm {lgb.__version__} installs it ({package}/lib)"
    )


_LIBRARY: Final = ctypes.CDLL(str(_library_path()))
_LIBRARY.LGBM_GetLastError.restype = ctypes.c_char_p


def _check(return_code: int) -> None:
    if return_code != 0:
        raise NativeLightGBMError(_LIBRARY.LGBM_GetLastError().decode())


class SingleRowPredictor:
    """One model's single-row predictions; calls must not overlap (one event loop uses it)."""

    def __init__(self, booster: lgb.Booster, width: int) -> None:
        self._booster = ctypes.c_void_p()
        self._config = ctypes.c_void_p()
        iterations = ctypes.c_int()
        _check(
            _LIBRARY.LGBM_BoosterLoadModelFromString(
                ctypes.c_char_p(booster.model_to_string().encode()),
                ctypes.byref(iterations),
                ctypes.byref(self._booster),
            )
        )
        self._out = np.empty(1, dtype=np.float64)
        self._out_length = ctypes.c_int64()
        self._out_pointer = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        _check(
            _LIBRARY.LGBM_BoosterPredictForMatSingleRowFastInit(
                self._booster,
                ctypes.c_int(_C_API_PREDICT_NORMAL),
                ctypes.c_int(0),  # from the first iteration
                ctypes.c_int(-1),  # to the last (the best, when early stopping kept one)
                ctypes.c_int(_C_API_DTYPE_FLOAT64),
                ctypes.c_int32(width),
                ctypes.c_char_p(b"num_threads=1"),
                ctypes.byref(self._config),
            )
        )

    def __call__(self, row: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The score of one C-contiguous float64 row, as a one-element array."""
        _check(
            _LIBRARY.LGBM_BoosterPredictForMatSingleRowFast(
                self._config,
                ctypes.c_void_p(row.ctypes.data),
                ctypes.byref(self._out_length),
                self._out_pointer,
            )
        )
        return self._out.copy()

    def __del__(self) -> None:
        if self._config.value is not None:
            _LIBRARY.LGBM_FastConfigFree(self._config)
        if self._booster.value is not None:
            _LIBRARY.LGBM_BoosterFree(self._booster)
