"""hybridlm: build, train, run and measure linear-attention hybrid language models."""

from hybridlm.config import HybridConfig

__version__ = "0.1.0"

# generate() lives in hybridlm.generation: a submodule named like the function would replace it
# on the package as soon as anything imported the submodule.
__all__ = ["HybridConfig", "HybridLM", "HybridCache", "generate", "__version__"]


def __getattr__(name):  # lazy: `import hybridlm` stays cheap for the calculator
    if name == "HybridLM":
        from hybridlm.model import HybridLM
        return HybridLM
    if name == "HybridCache":
        from hybridlm.cache import HybridCache
        return HybridCache
    if name == "generate":
        from hybridlm.generation import generate
        return generate
    raise AttributeError(f"module 'hybridlm' has no attribute {name!r}")
