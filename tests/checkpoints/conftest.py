import pytest

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
