import pytest

from tests.dist.harness import run_layout


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    """The reference every layout is compared with: one process, same model, same global batch."""
    return run_layout(tmp_path_factory.mktemp("single"), "single")
