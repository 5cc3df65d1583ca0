"""Deprecated: the shadow log is now the prediction log (``model_server.predictionlog``).

``read_shadow_log`` remains for callers not yet moved: the shadow pairs of a prediction log,
in the columns the shadow log had.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

from model_server.predictionlog import SHADOW_PAIR_COLUMNS, read, shadow_pairs


def read_shadow_log(
    root: str | Path, start: datetime, end: datetime, model: str | None = None
) -> pd.DataFrame:
    """Deprecated: ``shadow_pairs(read(uri, start, end, model, columns=SHADOW_PAIR_COLUMNS))``."""
    return shadow_pairs(
        read(root, start, end, model, columns=SHADOW_PAIR_COLUMNS, roles=("primary", "shadow"))
    )
