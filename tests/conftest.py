"""Shared test set-up: no network, deterministic, single-threaded torch (the CI machine has 2 cores), and an
empty working directory for every test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread from the start, so module- and session-scoped fixtures (reference runs and stores built
    once) compute with the same threads as the tests that compare against them, whatever the test order."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _in_an_empty_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test runs in its own empty working directory. The shipped configs name relative folders (``runs/...``):
    they land there, never in the checkout, whose ``runs/`` may hold the README's debug run (the README's first
    command, run before its second, must not change what the tests see). Shipped configs are found by name from
    anywhere (:func:`pgot.config.find_config`); tests reach repository files through absolute paths."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
