"""torch.compile and activation checkpointing as applied by flowmatch.models.parallelize, down to what runs.

Compilation uses a counting backend: AOTAutograd traces each block's forward and backward exactly as for inductor
(same partitioner), and the graphs then run eagerly while the backend counts them. Inductor itself would spend
minutes generating C++ for these tiny blocks on CPU, so the tests pass this backend through `apply_compile`'s
`backend` argument. Checkpointing shows in the compiled backward graph: with it, the backward recomputes the
block's forward (the attention forward kernel runs again); without it, the partitioner never recomputes attention.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_mmdit import inputs, randomized, tiny
from test_train import tiny_recipe
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition

import flowmatch
import flowmatch.training.assembly
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile


def _runs_attention_forward(gm: torch.fx.GraphModule) -> bool:
    """Whether a traced graph calls an attention forward kernel (any SDPA variant, not its backward)."""
    names = (str(node.target) for node in gm.graph.nodes if node.op == "call_function")
    return any("scaled_dot_product" in name and "backward" not in name for name in names)


class CountingBackend:
    """A torch.compile backend: AOTAutograd with inductor's partitioner, its graphs run eagerly and counted.

    Graph kinds: "forward" (records for backward), "inference" (compiled under no_grad), "backward", and
    "recomputing backward" (a backward graph that runs the attention forward again: checkpointing at work).
    """

    def __init__(self) -> None:
        self.graphs: Counter[str] = Counter()
        self.runs: Counter[str] = Counter()

    def _compiler(self, kind: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs):
            graph_kind = "recomputing backward" if kind == "backward" and _runs_attention_forward(gm) else kind
            self.graphs[graph_kind] += 1
            run_graph = boxed_nop(gm, example_inputs)

            def run(args):
                self.runs[graph_kind] += 1
                return run_graph(args)

            run._boxed_call = True  # AOTAutograd passes the argument list itself
            return run

        return compile_graph

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        aot = aot_autograd(fw_compiler=self._compiler("forward"), bw_compiler=self._compiler("backward"),
                           inference_compiler=self._compiler("inference"),
                           partition_fn=min_cut_rematerialization_partition)
        return aot(gm, example_inputs)


@pytest.mark.slow  # traces every block's forward and backward: ~3 s of CPU each
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager_and_recompute_only_when_checkpointed(checkpointing):
    torch._dynamo.reset()
    cfg = tiny(single_blocks=1)
    plain, compiled = randomized(cfg), randomized(cfg)
    if checkpointing:
        apply_activation_checkpointing(compiled)
    backend = CountingBackend()
    apply_compile(compiled, backend=backend)
    x, t, cond = inputs(cfg, mask=torch.tensor([[True] * 4 + [False], [True] * 5]))
    outs = []
    for model in (plain, compiled):
        out = model(x, t, cond)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    blocks = len(compiled.blocks())
    backward = "recomputing backward" if checkpointing else "backward"
    assert backend.runs == {"forward": blocks, backward: blocks}


@pytest.mark.slow  # a real training run with compiled blocks
def test_training_run_executes_compiled_checkpointed_blocks(tmp_path, digit_shards, monkeypatch):
    torch._dynamo.reset()
    backend, compiled = CountingBackend(), []

    def apply_compile_counted(model, **kwargs):
        compiled.append(model)
        return apply_compile(model, backend=backend, **kwargs)

    monkeypatch.setattr(flowmatch.training.assembly, "apply_compile", apply_compile_counted)
    steps = 2
    recipe = tiny_recipe(tmp_path / "run", digit_shards, **{
        "train.compile": True, "train.activation_checkpointing": True, "train.max_steps": steps,
        "train.checkpoint_every": steps,
    })
    summary = flowmatch.train(recipe)
    assert summary.final_step == steps and math.isfinite(summary.final_loss)

    (model,) = compiled  # the trainer compiled its model, once
    blocks = len(model.blocks())
    # Each step ran every block's compiled forward and backward (one micro batch per step), and every backward
    # recomputed its block's attention: checkpointing acted inside the compiled code.
    assert backend.runs["forward"] == backend.runs["recomputing backward"] == steps * blocks
    assert backend.runs["backward"] == 0
    # Validation at the end sampled through the compiled blocks too.
    assert backend.runs["inference"] > 0
