"""The numerics: pure torch, no Ray, no file I/O. One file per method; this registry maps names."""

from __future__ import annotations

from .awq import search_awq
from .mbq import search_mbq
from .qvlm import search_qvlm, search_qvlm_mbq
from .rtn import search_rtn
from .smoothquant import search_smoothquant
from .types import SearchFn

# method name -> search function. Methods register here as they land (awq, mbq, smoothquant, qvlm, ...).
SEARCHES: dict[str, SearchFn] = {
    "rtn": search_rtn,
    "awq": search_awq,
    "mbq": search_mbq,
    "smoothquant": search_smoothquant,
    "qvlm": search_qvlm,
    "qvlm+mbq": search_qvlm_mbq,
}


# methods that search on captured fp activations (all but RTN)
_NO_CALIB = {"rtn"}


def needs_calibration(method: str) -> bool:
    return method not in _NO_CALIB


def get_search(method: str) -> SearchFn:
    try:
        return SEARCHES[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known: {sorted(SEARCHES)}") from None
