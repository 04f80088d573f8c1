"""Session fixtures: tiny real transformers checkpoints and real PEFT adapters (see fixtures_models.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Keep the tiny models cheap and deterministic on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fixtures_models import Zoo  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    """Lazily built bases and adapters, shared by the whole session. Treat them as read-only."""
    import torch

    torch.set_num_threads(2)
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def pytest_terminal_summary(terminalreporter):
    """Print the observed element-wise differences against PEFT (collected by test_against_peft)."""
    mod = sys.modules.get("test_against_peft")
    stats = getattr(mod, "ULP_STATS", None)
    if not stats:
        return
    terminalreporter.section("merged elements that differ from PEFT merge_and_unload")
    for variant, (n_diff, n_total, max_ulp) in stats.items():
        terminalreporter.write_line(
            f"{variant:>16}: {n_diff:6d} / {n_total:8d} ({n_diff / n_total:.5%}), max {max_ulp} ulp"
        )
