"""Write reproduce/src/torch_adamp_reproduce/data/espeak_kws_logmel.npz (see torch_adamp_reproduce.tasks.audio_data).

Needs Debian's espeak-ng (apt-get install espeak-ng). Deterministic for a given espeak-ng version.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from torch_adamp_reproduce.tasks import audio_data

OUT = Path(__file__).resolve().parents[1] / "src" / "torch_adamp_reproduce" / "data" / audio_data.FILE

if __name__ == "__main__":
    start = time.perf_counter()
    arrays = audio_data.build()
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
