"""hybridlm's custom ops registered with inductor as fallbacks before ``torch.compile`` lowers a graph.

Inductor lowers an op it has no lowering for through an "implicit fallback" (a call of the op's own
kernel) and logs the op with its arguments the first time. Up to torch 2.11 that log line is built
eagerly, whatever the log level: ``str()`` of every argument's IR, which nests the IR of everything the
argument was computed from. For an op fed by the residual stream of a deep model that string grows
with depth: on an H200 with torch 2.11 the 48-layer Qwen3-Next decode step with the residual add +
norm as its custom op (``hybridlm::add_rms_norm_rows``) was still inside that ``str()``
(``torch/_inductor/exc.py`` ``operator_str``, under ``graph.py`` ``call_function``) after 200 s,
where the default step compiles in about a minute (12-04 session; stack in
``benchmarks/data/2026-12-04-h200/profile_4k_b1_addnorm_op.err``). torch 2.13 defers the string
(``LazyString``), so the CPU runs never stalled.

``register_inductor_fallbacks`` makes the same fallback inductor would make, with the layout
constraint inductor would pick (the op's layout tag, or the default one for custom ops), ahead of
time, so the logging branch is never taken. It changes no generated code.
"""

from __future__ import annotations

import torch


_REGISTERED = False


def fallbacks_registered() -> bool:
    """Whether ``register_inductor_fallbacks`` has registered every ``hybridlm::`` op in this process
    (layers that may hand a deep graph's residual stream to a custom op under compile ask first)."""
    return _REGISTERED


def register_inductor_fallbacks() -> list[str]:
    """Register every ``hybridlm::`` custom op that inductor has no lowering for yet as a fallback.

    Importing ``hybridlm.ops.triton`` first defines the ops. Without Triton, or on a torch whose
    inductor lacks one of the internals used here (``make_fallback``, ``get_layout_constraint_tag``,
    ``tag_to_layout_constraint``), nothing is registered and inductor falls back implicitly as
    before. Idempotent.

    Returns:
        the names of the ops registered by this call (empty when all were registered already).
    """
    try:
        import hybridlm.ops.triton  # noqa: F401  (defines the custom ops)
    except ImportError:
        return []
    import torch._inductor.graph as graph

    needed = ("lowerings", "make_fallback", "get_layout_constraint_tag", "tag_to_layout_constraint")
    if not all(hasattr(graph, name) for name in needed):
        return []
    registered = []
    for qualified in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hybridlm::")):
        op = getattr(torch.ops.hybridlm, qualified.split("::", 1)[1]).default  # custom_op: one overload
        if op in graph.lowerings:
            continue
        tag = graph.get_layout_constraint_tag(op, with_default=True)
        graph.make_fallback(op, layout_constraint=graph.tag_to_layout_constraint(tag))
        registered.append(qualified)
    global _REGISTERED
    _REGISTERED = True
    return registered
