import os

import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. It must be set before
# triton.jit wraps the kernels, i.e. before mptkern.ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pathlib  # noqa: E402

import pytest  # noqa: E402

# Real public datasets, as their repositories ship them, live outside the project (developers and
# CI have them beside the checkout; a user's clone does not). MPTKERN_REAL_DATA points elsewhere.
REAL_DATA = pathlib.Path(os.environ.get("MPTKERN_REAL_DATA",
                                        pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))


@pytest.fixture
def real_data() -> pathlib.Path:
    """The folder of real public datasets (see its SOURCES.md); skips the test when it is absent."""
    if not (REAL_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real public datasets not found at {REAL_DATA} (set MPTKERN_REAL_DATA to their folder)")
    return REAL_DATA
