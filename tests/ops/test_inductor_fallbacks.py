"""Our custom ops reach inductor as fallbacks registered up front (``hybridlm.ops._inductor``), so
inductor never takes its implicit-fallback branch, whose log line stringified the arguments' whole IR
(eagerly up to torch 2.11: the 48-layer compiled step stalled in it on the H200). Each case compiles
in a fresh process: lowerings are global, so an earlier test's compile would otherwise have made the
fallback already."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = r"""
import json, logging, sys
import torch
from hybridlm.ops._inductor import fallbacks_registered, register_inductor_fallbacks
from hybridlm.ops.triton.norm import add_rms_norm_rows

before = fallbacks_registered()
registered = register_inductor_fallbacks() if sys.argv[1] == "register" else []
messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
log = logging.getLogger("torch._inductor.graph")
log.addHandler(Keep())
log.setLevel(logging.INFO)

def f(x, y, w):
    s, n = add_rms_norm_rows(x + 1.0, y, w, 1e-6)
    return s * 2.0, n

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter (set by the test)
x, y, w = (torch.randn(*shape, device=dev) for shape in ((3, 64), (3, 64), (64,)))
got = torch.compile(f, fullgraph=True)(x, y, w)
want = f(x, y, w)
print(json.dumps({
    "registered": registered,
    "flag": [before, fallbacks_registered(), register_inductor_fallbacks() if sys.argv[1] == "register" else None],
    "implicit": [m.split("\n", 1)[-1].strip()[:300] for m in messages if m.startswith("Creating implicit fallback")],
    "err": max(float((a - b).abs().max()) for a, b in zip(got, want)),
}))
"""


def _run(mode: str, cache_dir) -> dict:
    # no inductor caches: a cached graph skips lowering, and with it the fallback this test looks for
    # (a shared /tmp/torchinductor_* from an earlier run made the first case pass vacuously)
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_registered_ops_take_no_implicit_fallback_and_compile_to_the_same_result(tmp_path):
    without = _run("plain", tmp_path / "plain")
    # the detection works: left to itself, inductor makes the implicit fallback (and logs it)
    assert any("hybridlm.add_rms_norm_rows" in m for m in without["implicit"]), without
    registered = _run("register", tmp_path / "register")
    assert "hybridlm::add_rms_norm_rows" in registered["registered"]
    assert not any("hybridlm" in m for m in registered["implicit"]), registered
    # RMSNorm.add asks this flag before it hands the residual stream to its op under compile; a second
    # call registers nothing new
    assert without["flag"] == [False, False, None] and registered["flag"] == [False, True, []]
    assert registered["err"] < 1e-5 and without["err"] < 1e-5
