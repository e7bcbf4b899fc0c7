"""Trainer: it learns, resumes bit-exactly, refuses bad checkpoints, and runs data-parallel with gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridConfig, HybridLM
from hybridlm.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from hybridlm.tasks import MQAR, ByteText
from hybridlm.train import TrainConfig, evaluate, lr_at, make_optimizer, masked_loss, train

TASK = MQAR(num_pairs=4, seq_len=24, vocab_size=32)
CONFIG = HybridConfig(vocab_size=32, num_layers=2, layer_pattern="GA", hidden_size=32, intermediate_size=64)


def fresh_model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return HybridLM(config)


def small_cfg(**kw):
    base = dict(steps=8, batch_size=4, warmup_steps=2, eval_batches=1, log_every=100)
    return TrainConfig(**{**base, **kw})


def test_twenty_steps_lower_the_loss():
    result = train(fresh_model(), TASK, small_cfg(steps=20, batch_size=8, lr=1e-2), progress=False)
    assert len(result.losses) == 20
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.2, (first, last)
    assert result.evals[-1]["step"] == 20 and 0 <= result.evals[-1]["accuracy"] <= 1


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    cfg = small_cfg(steps=8, grad_accum=2, checkpoint_every=3, eval_every=4)
    whole_model = fresh_model()
    whole = train(whole_model, TASK, cfg, progress=False)
    part_dir = tmp_path / "run"
    first = train(fresh_model(), TASK, cfg, out_dir=part_dir, stop_after=5, progress=False)
    assert len(first.losses) == 5
    # A different seed for the fresh model: everything must come from the checkpoint.
    resumed_model = fresh_model(seed=123)
    resumed = train(resumed_model, TASK, cfg, out_dir=part_dir, resume=True, progress=False)
    assert resumed.losses == whole.losses  # bit for bit
    assert resumed.evals == whole.evals
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_keep_the_last_k(tmp_path):
    train(fresh_model(), TASK, small_cfg(steps=8, checkpoint_every=2, keep_checkpoints=2), out_dir=tmp_path,
          progress=False)
    assert [s for s, _ in checkpoint_paths(tmp_path)] == [6, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000006.json", "step-000006.safetensors", "step-000008.json", "step-000008.safetensors"]


def test_checkpoint_restores_optimizer_and_rng(tmp_path):
    model = fresh_model()
    opt = make_optimizer(model, small_cfg())
    x, y = TASK.batch(4, "train", 0, 0)
    masked_loss(model(x), y).backward()
    opt.step()
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 1, model, opt, {"tag": "t"})
    expected_draw = torch.rand(3)
    model2 = fresh_model(seed=5)
    opt2 = make_optimizer(model2, small_cfg())
    load_checkpoint(path, model2, opt2)
    assert torch.equal(torch.rand(3), expected_draw)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for key, value in st.items():
            assert torch.equal(value, s2["state"][i][key]), (i, key)


def test_corrupted_checkpoint_is_refused(tmp_path):
    train(fresh_model(), TASK, small_cfg(steps=2), out_dir=tmp_path, progress=False)
    tensors = tmp_path / "step-000002.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(tmp_path, fresh_model())
    (tmp_path / "step-000002.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path, fresh_model())


def test_foreign_checkpoint_is_refused(tmp_path):
    train(fresh_model(), TASK, small_cfg(steps=4), out_dir=tmp_path, stop_after=2,
          meta={"model": CONFIG.to_dict()}, progress=False)
    other = CONFIG.replace(layer_pattern="A")
    # Another run's config in the sidecar ...
    with pytest.raises(ValueError, match="different model"):
        train(HybridLM(other), TASK, small_cfg(steps=4), out_dir=tmp_path, resume=True,
              meta={"model": other.to_dict()}, progress=False)
    # ... another model's tensors ...
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(tmp_path, HybridLM(other))
    # ... and a JSON file that is not a hybridlm checkpoint at all.
    (tmp_path / "step-000009.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a hybridlm training checkpoint"):
        load_checkpoint(tmp_path, fresh_model())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_evaluate_counts_answer_tokens_only():
    model = fresh_model()
    out = evaluate(model, TASK, batch_size=4, batches=2)
    assert out["tokens"] == 2 * 4 * 4  # batches * batch * queries


def test_byte_text_trains(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
    data = ByteText(text, seq_len=32)
    x, y = data.batch(4, "train", 0, 0)
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    model = fresh_model(HybridConfig(vocab_size=256, num_layers=2, hidden_size=32, intermediate_size=64))
    result = train(model, data, small_cfg(steps=15, batch_size=8, lr=1e-2), progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5


@pytest.mark.parametrize("bad, match", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                                        ({"min_lr_ratio": 2.0}, "min_lr_ratio"), ({"grad_accum": 1.5}, "grad_accum")])
def test_bad_train_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def _cli_train(out, extra, nproc=None):
    args = ["-m", "hybridlm.cli", "train", "--pattern", "GGGA", "--layers", "2", "--hidden", "32",
            "--task-vocab", "32", "--pairs", "4", "--seq-len", "24", "--steps", "4", "--batch-size", "4",
            "--warmup", "1", "--eval-batches", "1", "--threads", "1", "--out", str(out), *extra]
    if nproc:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((Path(out) / "summary.json").read_text())


def test_two_process_gloo_matches_one_process_with_accumulation(tmp_path):
    # Two ranks reading batches (2s, 2s+1) see what one process with two micro-batches sees.
    ddp = _cli_train(tmp_path / "ddp", [], nproc=2)
    single = _cli_train(tmp_path / "single", ["--grad-accum", "2"])
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert ddp["losses"][-1] != ddp["losses"][0]
