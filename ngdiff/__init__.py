"""NGDiff: unlearning as two-task optimisation with normalised gradient difference and AutoLR."""

from pathlib import Path

__version__ = "0.1.0"

RESOURCES = Path(__file__).parent / "resources"
TOFU_DIR = RESOURCES / "tofu"
MUSE_DIR = RESOURCES / "muse_news"
