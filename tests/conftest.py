"""Session fixtures: the tiny real checkpoints and adapters of builders.py, each built once per session."""

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

import builders  # noqa: E402

# The fast tier (`pytest -m "not slow"`, under 30 s on 2 cores) leaves out what is slow by nature: every
# test that uses a fixture building models with transformers or PEFT (these fixtures, directly or through
# another), and the modules and tests marked `slow` themselves (real processes killed and resumed, gigabyte
# inputs, transformers loads in the test body).
MODEL_FIXTURES = frozenset({"zoo", "arts", "matrix", "arch_zoo", "moe", "fp8", "fp8_dirs", "tok"})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds models with transformers/PEFT or runs for seconds; "
                                       "-m 'not slow' leaves it out")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> builders.Zoo:
    """Table 1 (builders.BASES / ADAPTERS), built lazily and shared by the whole session. Read-only."""
    return builders.Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def arts(tmp_path_factory) -> builders.ArtifactZoo:
    """Table 2 (builders.ABASES / AADAPTERS), built lazily and shared by the whole session. Read-only."""
    return builders.ArtifactZoo(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """qwen_merge.demo's base and adapter (seed 0), built once. Read-only: copy before editing."""
    return builders.demo_pair(tmp_path_factory.mktemp("demo-pristine"), seed=0)


@pytest.fixture(scope="session")
def demo_merged(demo_inputs, tmp_path_factory) -> Path:
    """The demo pair merged once, with its manifest (a reference output; a base that already holds the
    adapter). Read-only."""
    from qwen_merge import merge_shards

    out = tmp_path_factory.mktemp("demo-merged") / "merged"
    merge_shards(*demo_inputs, out, progress=False)
    return out


def pytest_terminal_summary(terminalreporter):
    """Print the observed element-wise differences collected by the tests (builders.record / note)."""
    for section in sorted(builders.ULP_STATS):
        terminalreporter.section(section)
        for line in builders.stats_lines(section):
            terminalreporter.write_line(line)
