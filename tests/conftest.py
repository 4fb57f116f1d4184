import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the machines that run the tests have no hub access
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Small episodes keep the suite fast; the planted calibration test uses the real defaults.
SMALL = {"decisions": 3, "inner_steps": 2}


@pytest.fixture(scope="session")
def shakespeare() -> str:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is not present")
    return str(SHAKESPEARE)
