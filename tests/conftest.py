import pytest
import torch
import torch._dynamo

from recording_method import recording_method  # noqa: F401  (fixture)


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
