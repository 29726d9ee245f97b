"""What a growth operator returns."""
from __future__ import annotations

from dataclasses import dataclass

from stackfast.growth.ramp import Ramp
from stackfast.model import Transformer


@dataclass
class Growth:
    """The grown model, its spec and, for the G_random operators, the fade-in ramp.

    spec is plain data (JSON): operator, factor, layer map and options. It is saved with
    every checkpoint after growth, so the grown architecture (and a ramp in progress) can be
    rebuilt and audited; `stackfast grow` prints the layer map.
    """
    model: Transformer
    spec: dict
    ramp: Ramp | None = None
