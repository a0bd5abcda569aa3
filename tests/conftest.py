import pytest
import torch
import torch._dynamo

from recording_method import recording_method  # noqa: F401  (fixture)
from sparse_compile import options

DEFAULT_DENSE_TIMESTEP_FRACTION = options.DEFAULT_DENSE_TIMESTEP_FRACTION


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (no cache hits from another test's graphs)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def no_default_timestep_warmup(monkeypatch):
    """Compiled models run their method from the first forward: the default timestep warm-up is off
    unless a test asks for it with :func:`default_timestep_warmup`."""
    monkeypatch.setattr(options, "DEFAULT_DENSE_TIMESTEP_FRACTION", 0.0)


@pytest.fixture
def default_timestep_warmup(monkeypatch):
    """The backend's default timestep warm-up, as users get it."""
    monkeypatch.setattr(options, "DEFAULT_DENSE_TIMESTEP_FRACTION", DEFAULT_DENSE_TIMESTEP_FRACTION)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled float and -7-filled integer tensors: unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", empty)
