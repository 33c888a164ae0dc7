"""Test setup: Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ``@triton.jit`` decorators run, i.e. before
``pcm_kernels`` is first imported. Triton's compiler library is loaded here, first: loaded after
an env has rendered through Mesa's EGL (whose LLVM is then in the process), it segfaults
(docs/metaworld.md, "Rendering").
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (real LIBERO episodes)")


@pytest.fixture
def use_backend(monkeypatch):
    """Call ``use_backend("torch"|"triton")`` to force the backend for the rest of the test."""
    def choose(name: str):
        monkeypatch.setenv("PCM_KERNELS_BACKEND", name)
    return choose


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
