"""Every published preset runs at its real widths: one layer of each type it uses, a couple of
experts and a small vocabulary so it fits a CI machine (the issue's "layer or expert count
override"); prefill and one decode step give finite logits that agree with the full forward."""

import pytest
import torch

from hybridlm import HybridConfig, HybridLM
from hybridlm.presets import PRESETS, TINY_PRESETS

PUBLISHED = [n for n in PRESETS if n not in TINY_PRESETS]


def shrunk(cfg: HybridConfig) -> HybridConfig:
    letters = "".join(dict.fromkeys(cfg.layer_types))  # each layer type once, in order
    over = dict(layer_pattern=letters, num_layers=len(letters), vocab_size=512)
    if cfg.num_experts:
        over.update(num_experts=2, num_experts_per_tok=1, first_dense_layers=min(cfg.first_dense_layers, 1))
        if getattr(cfg, "n_group", 0):
            over.update(n_group=1, topk_group=1)
    return cfg.replace(**over)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_preset_runs_at_real_width(name):
    cfg = shrunk(HybridConfig.preset(name))
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 8)
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:], cache=cache)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
