"""Progress bars: tqdm's own choice of kind (a widget in a notebook, text in a terminal), which
``TQDM_DISABLE=1`` switches off everywhere. tqdm reads that variable for its text bars but its notebook
bars ignore it, so unattended notebook runs (``run_all.sh`` sets it) would otherwise fill the executed
notebooks with one widget per loop."""
from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm as _tqdm


def bars_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm`` with ``disable=True`` forced while ``TQDM_DISABLE`` is set."""
    if bars_disabled():
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
