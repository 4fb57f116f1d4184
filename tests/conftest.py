import os
import random
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


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """A small English-like text with structure to learn (a tiny grammar over a fixed vocabulary)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "her brother", "our teacher"]
    verbs = ["sees", "likes", "finds", "follows", "answers", "remembers"]
    objects = ["the river", "a small house", "the letter", "his horse", "the red door", "an apple"]
    text = "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(lines))
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The tests' own text corpus: causal_lm tests need nothing from outside the repository."""
    return str(write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt"))
