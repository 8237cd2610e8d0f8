"""Fine-tuning through the real trainer on the digits: `model.init_from` (a flowmatch run, a diffusers folder, an
original single file), staged runs, and LoRA runs (adapters only in the optimizer and the checkpoints, resume,
the pipeline, `flowmatch export --lora` into diffusers and `--merge`). The base is a tiny digits run of 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

import flowmatch
from flowmatch.checkpoint import read_meta
from flowmatch.checkpoint.manifest import read_manifest, sha256_file
from flowmatch.cli import main
from flowmatch.config import RecipeError
from flowmatch.families.convert import from_diffusers
from flowmatch.init_from import load_weights as load_init
from flowmatch.init_from import locate, record
from flowmatch.models.lora import is_adapter
from flowmatch.run import source_architecture as architecture
from flowmatch.training import train
from flowmatch.training.assembly import assemble
from tests.interop_models import (
    one_thread,  # noqa: F401 - applies the module-wide fixture
    rel_err,
)
from tests.test_export import digits_inputs
from tests.test_train import read_metrics, tiny_recipe

REL_TOL = 1e-4
LORA = {"rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def base(tmp_path_factory, digit_shards) -> Path:
    """Stage 1: the tiny digits model trained for 2 steps."""
    run = tmp_path_factory.mktemp("finetune") / "base"
    train(tiny_recipe(run, digit_shards, **{"train.max_steps": 2}))
    return run


def default_weights(run: Path) -> tuple[str, dict]:
    """(file name, tensors) of the weights a run's pipelines load by default."""
    ckpt = run / "checkpoints" / str(read_meta(run).step)
    name = "ema.safetensors" if read_meta(ckpt).ema_default is not False else "model.safetensors"
    return name, load_file(ckpt / name)


def test_init_from_a_run_starts_from_its_weights(base, tmp_path, digit_shards):
    """Bug caught: init_from read but the random init kept (or the other weights file taken)."""
    name, want = default_weights(base)
    run = assemble(tiny_recipe(tmp_path / "s2", digit_shards, **{"model.init_from": str(base)}))
    with run:
        got = run.engine.model_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (run.init.kind, run.init.weights) == ("checkpoint", name)
    assert run.init.sha256 == read_manifest(base / "checkpoints" / "2")[name]["sha256"]


def test_staged_run_trains_its_own_steps_and_records_its_start(base, tmp_path, digit_shards):
    """Stage 2 in a new run_dir from stage 1's final weights: steps 0 -> its own max_steps (the old hand copy of a
    checkpoint started at stage 1's step and trained nothing)."""
    stage2 = tmp_path / "stage2"
    summary = train(tiny_recipe(stage2, digit_shards, **{"model.init_from": str(base), "train.max_steps": 3}))
    assert (summary.start_step, summary.final_step) == (0, 3)
    assert [m["step"] for m in read_metrics(stage2) if "loss" in m] == [1, 2, 3]
    recorded = read_meta(stage2).init_from
    assert recorded["kind"] == "checkpoint" and recorded["source"] == str(base)
    assert recorded["sha256"] == read_manifest(base / "checkpoints" / "2")[recorded["weights"]]["sha256"]
    saved = yaml_model(stage2)
    assert saved["init_from"] == str(base) and saved["depth"] == 2


def yaml_model(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())["model"]


def test_shipped_staged_recipes_start_from_the_previous_stage():
    from flowmatch.config import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    stages = [load_recipe(root / f"sd3-medium-{size}.yaml") for size in (256, 512, 1024)]
    assert stages[0].model.init_from is None
    for previous, stage in zip(stages, stages[1:]):
        assert stage.model.init_from == previous.run_dir and stage.run_dir != previous.run_dir
    assert len({s.train.max_steps for s in stages}) == 3  # each stage states its own length


def test_a_stated_architecture_must_agree_with_the_weights(base, tmp_path, digit_shards):
    with pytest.raises(RecipeError, match=r"model.depth=3, but model.init_from=.* holds weights with depth=2"):
        assemble(tiny_recipe(tmp_path / "a", digit_shards, **{"model.init_from": str(base), "model.depth": 3}))
    with pytest.raises(RecipeError, match=r"model.preset=digits gives .*=.*but model.init_from"):
        assemble(tiny_recipe(tmp_path / "b", digit_shards, **{"model.init_from": str(base),
                                                              "model.preset": "digits"}))
    with pytest.raises(RecipeError, match="does not exist"):
        assemble(tiny_recipe(tmp_path / "c", digit_shards, **{"model.init_from": str(tmp_path / "nothing")}))


def test_a_relative_run_path_that_is_missing_is_not_left_as_a_hub_error(monkeypatch):
    """Bug caught: ``init_from: runs/digits`` before that run exists (it reads like a hub id) surfacing as the hub
    client's connection error instead of naming the key and what to do."""
    def offline(repo_id):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("flowmatch.init_from._hub_folder", offline)
    with pytest.raises(RecipeError, match=r"model.init_from='runs/not-yet' is no path .*ConnectionError.*train that "
                                          r"run first"):
        locate("runs/not-yet")


def test_init_from_diffusers_folders_and_original_files(base, tmp_path):
    """The same weights through each kind of source: architecture and tensors exactly the run's."""
    out = tmp_path / "export"
    assert main(["export", str(base), str(out), "--weights", "ema"]) == 0
    # beside it, and its scheduler/ again (an existing part is replaced only with --overwrite)
    assert main(["export", str(base), str(out), "--weights", "ema", "--format", "original", "--overwrite"]) == 0
    ema = load_file(base / "checkpoints" / "2" / "ema.safetensors")
    run_arch = architecture(*locate(str(base)))
    for source, kind in ((out, "diffusers"), (out / "transformer", "diffusers"),
                         (out / "transformer.safetensors", "original")):
        found = locate(str(source))
        assert found[0] == kind
        assert {k: v for k, v in vars(architecture(*found)).items() if k != "preset"} == \
            {k: v for k, v in vars(run_arch).items() if k != "preset"}
        rec = record(str(source), *found)
        files = [found[1]] if kind == "original" else sorted(found[1].glob("*.safetensors"))
        assert len(files) == 1 and rec.sha256 == sha256_file(files[0])
        state = load_init(rec)
        assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema), source


# ----------------------------------------------------------------------------------------------------- LoRA


def lora_recipe(run: Path, shards: Path, base: Path, **extra):
    return tiny_recipe(run, shards, **{"model.init_from": str(base), "model.lora": LORA,
                                       "optim.schedule": "constant", "optim.lr": 0.01, **extra})


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory, digit_shards) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    train(lora_recipe(run, digit_shards, base))
    return run


def test_lora_run_keeps_only_adapters(lora_run, base):
    """Bugs caught: base weights left trainable (optimizer state, checkpoint and EMA of the whole model), the
    base's record missing from the checkpoint."""
    ckpt = lora_run / "checkpoints" / "4"
    for name in ("model.safetensors", "ema.safetensors"):
        saved = load_file(ckpt / name)
        assert saved and all(is_adapter(k) for k in saved), name
    n_adapters = len(load_file(ckpt / "model.safetensors"))
    optimizer = json.loads((ckpt / "state" / "rank00000.json").read_text())["optimizer"]
    assert optimizer["masters"] == n_adapters  # AdamW holds the adapters and nothing else
    state = load_file(ckpt / "state" / "rank00000.safetensors")
    assert {k.split(".")[2] for k in state if k.startswith("optim.state.")} == {str(i) for i in range(n_adapters)}
    name, _ = default_weights(base)
    assert read_meta(ckpt).init_from["sha256"] == read_manifest(base / "checkpoints" / "2")[name]["sha256"]
    # The adapters trained: B moved off its zero init (on the image stream; the base, 2 steps from adaLN-zero, still
    # gates the first block's text output to exactly zero, so that adapter gets no gradient).
    raw = load_file(ckpt / "model.safetensors")
    assert all(raw[k].abs().max() > 0 for k in raw if ".lora_B." in k and ".img." in k)


def test_lora_resume_is_bit_identical(lora_run, base, tmp_path, digit_shards):
    split = tmp_path / "split"
    train(lora_recipe(split, digit_shards, base, **{"train.max_steps": 2}))
    summary = train(lora_recipe(split, digit_shards, base))
    assert (summary.start_step, summary.final_step) == (2, 4)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(lora_run / "checkpoints" / "4" / name), load_file(split / "checkpoints" / "4" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["loss"] for m in read_metrics(lora_run) if "loss" in m] == \
        [m["loss"] for m in read_metrics(split) if "loss" in m]


def test_lora_pipeline_applies_the_adapters_to_the_recorded_base(lora_run, base):
    pipe = flowmatch.Pipeline.from_checkpoint(lora_run, ema=False)
    state = pipe.model.state_dict()
    _, base_weights = default_weights(base)
    raw = load_file(lora_run / "checkpoints" / "4" / "model.safetensors")
    assert all(torch.equal(state[k], raw[k]) for k in raw)
    qkv = "joint_blocks.0.img.qkv"
    assert torch.equal(state[f"{qkv}.base_layer.weight"], base_weights[f"{qkv}.weight"])
    images = pipe.generate(["a handwritten 3"], steps=2, seed=0)
    assert images.shape == (1, 1, 8, 8)


def test_lora_export_loads_in_diffusers_and_merges(lora_run, base, tmp_path):
    """`flowmatch export --lora` into diffusers' SD3Transformer2DModel holding the base weights gives our LoRA
    pipeline's velocities; `--merge` gives them from one transformer folder."""
    name, _ = default_weights(base)
    base_out, lora_out, merged_out = tmp_path / "base", tmp_path / "lora", tmp_path / "merged"
    assert main(["export", str(base), str(base_out), "--weights", "ema" if name == "ema.safetensors" else "raw"]) == 0
    assert main(["export", str(lora_run), str(lora_out), "--lora", "--weights", "raw"]) == 0
    assert main(["export", str(lora_run), str(merged_out), "--merge", "--weights", "raw"]) == 0
    assert main(["export", str(lora_run), str(tmp_path / "x")]) == 1  # a LoRA run needs --lora or --merge

    ours = flowmatch.Pipeline.from_checkpoint(lora_run, ema=False).model
    theirs = SD3Transformer2DModel.from_pretrained(base_out / "transformer").eval()
    theirs.load_lora_adapter(str(lora_out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    merged = from_diffusers(merged_out / "transformer").eval()
    x, t, cond = digits_inputs(ours)
    with torch.no_grad():
        want = ours(x, t, cond)
        got = theirs(x, cond.hidden, cond.pooled, t * 1000).sample
        base_only = from_diffusers(base_out / "transformer").eval()(x, t, cond)
        got_merged = merged(x, t, cond)
    assert rel_err(got, want) < REL_TOL and rel_err(got_merged, want) < REL_TOL
    # 4 steps of LoRA move the output by about 1e-3 of its size: the adapters' own contribution must agree too.
    delta = want - base_only
    assert rel_err(base_only, want) > 5 * REL_TOL
    assert rel_err(got - base_only, delta) < 1e-2 and rel_err(got_merged - base_only, delta) < 1e-2


def test_lora_resume_on_other_base_weights_is_an_error(lora_run, base, tmp_path, digit_shards):
    """Bug caught: resuming adapters on whatever init_from now names (they were trained on other weights)."""
    import shutil

    from flowmatch.training.loop import TrainingError

    other = tmp_path / "other"
    assert main(["export", str(base), str(other), "--weights", "raw", "--format", "original"]) == 0
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    with pytest.raises(TrainingError, match="trained on base weights with SHA-256"):
        train(lora_recipe(run, digit_shards, other / "transformer.safetensors", **{"train.max_steps": 6}))


def test_lora_exports_in_each_format_start_a_new_run_with_the_same_adapters(lora_run, base, tmp_path, digit_shards):
    """`flowmatch export --lora --format comfyui | kohya`, then `model.lora.init_from` on the exported file: the new
    run's adapters are the run's own. Bugs caught: the trainer not reading init_from (fresh adapters), the export
    ignoring --format."""
    raw = load_file(lora_run / "checkpoints" / "4" / "model.safetensors")
    for fmt, prefix in (("comfyui", "diffusion_model."), ("kohya", "lora_unet_")):
        out = tmp_path / fmt
        assert main(["export", str(lora_run), str(out), "--lora", "--format", fmt, "--weights", "raw"]) == 0
        file = out / f"lora_{fmt}.safetensors"
        assert all(k.startswith(prefix) for k in load_file(file))
        run = assemble(lora_recipe(tmp_path / f"from-{fmt}", digit_shards, base,
                                   **{"model.lora": {**LORA, "init_from": str(file)}}))
        with run:
            got = run.engine.model_state_dict()
        assert raw.keys() <= got.keys() and all(torch.equal(got[k], raw[k]) for k in raw), fmt
    assert main(["export", str(lora_run), str(tmp_path / "x"), "--lora", "--format", "comfy"]) == 1
    with pytest.raises(FileNotFoundError, match="model.lora.init_from=.*is not a file"):
        assemble(lora_recipe(tmp_path / "missing", digit_shards, base,
                             **{"model.lora": {**LORA, "init_from": str(tmp_path / "gone.safetensors")}}))
    with pytest.raises(RecipeError, match="init_from must be a .safetensors"):
        lora_recipe(tmp_path / "pickle", digit_shards, base, **{"model.lora": {**LORA, "init_from": "lora.pt"}})
