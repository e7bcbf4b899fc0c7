"""Named configs. Tiny presets (tests, the default study) share the structure of real models at a
size that runs in milliseconds on a CPU. Published presets carry the released dimensions and cite
their source in ``meta``.

Each entry is a zero-argument function returning a fresh ``HybridConfig``.
"""

from __future__ import annotations

from typing import Callable

from hybridlm.config import HybridConfig


def _tiny(**kw) -> Callable[[], HybridConfig]:
    return lambda: HybridConfig(**kw)


PRESETS: dict[str, Callable[[], HybridConfig]] = {
    # -- tiny (tests and the CPU study); defaults: hidden 64, 4 heads of 16, vocab 256 --
    "tiny-mha": _tiny(layer_pattern="A", num_layers=4),
    "tiny-gdn": _tiny(layer_pattern="G", num_layers=4),
    "tiny-hybrid-3to1": _tiny(layer_pattern="GGGA", num_layers=4),
    "tiny-hybrid-7to1": _tiny(layer_pattern="GGGGGGGA", num_layers=8),
    "tiny-linear": _tiny(layer_pattern="X", num_layers=4),
    "tiny-deltanet": _tiny(layer_pattern="D", num_layers=4),
    "tiny-swa": _tiny(layer_pattern="GGGW", num_layers=4, sliding_window=8),
    "tiny-moe": _tiny(layer_pattern="GGGA", num_layers=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32),
}

TINY_PRESETS = tuple(n for n in PRESETS if n.startswith("tiny-"))
