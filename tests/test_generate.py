"""generate(): mixed prompt lengths == each prompt alone, stop tokens, reproducible sampling, CLI."""

import json

import pytest
import torch

from hybridlm import cli
from hybridlm.config import HybridConfig
from hybridlm.generation import decode_one_token, generate, left_pad, prefill, sample
from hybridlm.model import HybridLM
from hybridlm.presets import TINY_PRESETS
from test_model import tiny  # same seeded tiny model with non-trivial weights

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 250, 7], [3, 3, 3, 90, 12, 6, 1, 2, 200, 31, 4, 11]]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_mixed_lengths_equal_each_prompt_alone(name):
    model = tiny(name)
    batched = generate(model, PROMPTS, 5)
    assert batched.shape == (3, 5) and batched.dtype == torch.long
    assert len({tuple(row) for row in batched.tolist()}) > 1  # the prompts matter
    for b, p in enumerate(PROMPTS):
        assert batched[b].tolist() == generate(model, [p], 5)[0].tolist()


@pytest.mark.parametrize("name", ["tiny-hybrid-3to1", "tiny-swa", "tiny-linear"])
def test_batched_logits_match_alone(name):
    model = tiny(name)
    ids, mask = left_pad(PROMPTS, 0)
    cache = model.new_cache(3, 16)
    logits = [prefill(model, ids, mask, cache)]
    nxt = torch.tensor([4, 5, 6])
    logits.append(decode_one_token(model, nxt, cache))
    for b, p in enumerate(PROMPTS):
        alone_cache = model.new_cache(1, 16)
        alone = [prefill(model, torch.tensor([p]), None, alone_cache), decode_one_token(model, nxt[b:b + 1], alone_cache)]
        for got, want in zip(logits, alone):
            torch.testing.assert_close(got[b], want[0], rtol=1e-5, atol=1e-5)


def test_tensor_input_with_mask_equals_list_input():
    model = tiny("tiny-hybrid-3to1")
    ids, mask = left_pad(PROMPTS, 7)
    assert ids[0, :9].tolist() == [7] * 9 and mask[0].tolist() == [0] * 9 + [1] * 3
    torch.testing.assert_close(generate(model, ids, 4, attention_mask=mask), generate(model, PROMPTS, 4))


def test_stop_tokens_end_rows_and_the_loop():
    model = tiny("tiny-gdn")
    free = generate(model, PROMPTS, 8)
    stop = int(free[0, 2])
    out = generate(model, PROMPTS, 8, stop_tokens=[stop], pad_token_id=255)
    for b in range(3):
        row = free[b].tolist()
        if stop in row:
            i = row.index(stop)
            assert out[b, :i + 1].tolist() == row[:i + 1] and (out[b, i + 1:] == 255).all()
        else:
            assert out[b].tolist() == row
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    all_stop = generate(model, [PROMPTS[0]], 8, stop_tokens=[int(free[0, 0])])
    assert len(calls) == 1 and (all_stop[0, 1:] == 0).all()  # only the prefill ran


def test_sampling_is_reproducible_and_varies_with_seed():
    model = tiny("tiny-hybrid-3to1")

    def draw(seed):
        return generate(model, PROMPTS, 6, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_top_k_and_top_p_pick_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 2, None, g).tolist()) == {1, 3}
    assert set(sample(logits, 1.0, None, 0.7, g).tolist()) == {1, 3}   # 0.5 + 0.3 reaches 0.7
    assert set(sample(logits, 1.0, None, 0.85, g).tolist()) == {1, 2, 3}
    assert set(sample(logits, 1.0, None, 0.5, g).tolist()) == {1}
    assert set(sample(logits, 1.0, 3, 0.1, g).tolist()) == {1}
    assert set(sample(logits, 1.0, None, None, g).tolist()) == {0, 1, 2, 3}
    assert sample(logits[:1], 0.0, None, None, None).tolist() == [1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(pad_token_id=-1), "pad_token_id"),
])
def test_bad_arguments(kwargs, match):
    model = tiny("tiny-gdn")
    args = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, [[1, 2]], args.pop("max_new_tokens"), **args)


def test_bad_prompts():
    model = tiny("tiny-gdn")
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.ones(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, "1 2 3", 2)


def test_cli_generate(capsys):
    argv = ["generate", "--preset", "tiny-hybrid-3to1", "--prompt-ids", "1 2 3", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 5 and all(0 <= int(t) < 256 for t in first)
    assert cli.main(argv + ["--temperature", "1", "--top-k", "4", "--seed", "3"]) == 0
    assert len(capsys.readouterr().out.split()) == 5
    assert cli.main(["generate", "--prompt-ids", "1 999"]) == 2
    assert "input_ids" in capsys.readouterr().err


def test_cli_info_reports_the_real_cache_bytes(capsys):
    assert cli.main(["info", "--preset", "tiny-swa", "--context", "1k", "--batch", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    real = HybridLM(HybridConfig.preset("tiny-swa")).new_cache(2, 1024)
    assert info["cache_bytes"] == real.nbytes() and info["cache_breakdown"] == real.breakdown()
    assert cli.main(["info", "--preset", "tiny-moe"]) == 0
    assert "layer 3 (A) kv" in capsys.readouterr().out
