import pytest
import torch

from hf_tiny import build


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(model_type) -> (transformers model, its saved folder); built once per session."""
    made = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = build(model_type, tmp_path_factory.mktemp(model_type))
        return made[model_type]

    return get


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: with several intra-op threads, OpenMP start-up and barriers cost more
    than the arithmetic (measured 70x slower for a decode step on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
