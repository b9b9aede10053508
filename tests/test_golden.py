"""Every path reproduces its recorded bits (tests/golden/trajectories.py).

The digests were recorded before the engine/rule redesign; a refactoring that
changes one bit of one parameter or state tensor on any path, option set or
dtype fails here. Bits depend on the CPU, the C compiler and torch, so the
digests are keyed by platform; on a platform without a record the test skips
and says how to record one (on the commit you trust).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import trajectories

RECORD = trajectories.load().get(trajectories.platform_key())
CASES = list(trajectories.cases())

pytestmark = pytest.mark.skipif(
    RECORD is None,
    reason=f"no recorded digests for platform {trajectories.platform_key()} "
    "(record them on a trusted commit: python tests/golden/trajectories.py record)",
)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bits_as_recorded(case: tuple) -> None:
    key, kind, options, _, path, dname = case
    assert RECORD is not None
    if key not in RECORD:
        pytest.fail(f"{key} has no recorded digest: record the platform again")
    assert trajectories.run_one(kind, options, path, trajectories.DTYPES[dname]) == RECORD[key]


def test_the_record_covers_every_case() -> None:
    assert RECORD is not None
    assert sorted(RECORD) == sorted(c[0] for c in CASES)
