"""The LoRA round trip every family's tiny random diffusers pipeline goes through (the rows are in
tests/test_lora_e2e.py): `model.init_from` the pipeline folder (the architecture comes from its transformer), two
steps of rank-4, alpha-8 adapters with its encoders, VAE and shift, `flowmatch export --lora` into the pipeline
class's `load_lora_weights` and `--merge` as a complete folder `DiffusionPipeline.from_pretrained` loads as that
class, both giving flowmatch's images from the same latents, steps and guidance (and the same reference images and
negative prompt where the family takes them), and the adapters moving the images far more than the two differ."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from flowmatch import Pipeline
from flowmatch.checkpoint import read_meta
from flowmatch.data.shardformat import ShardSink, reference_ext
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.config import ModelConfig
from flowmatch.lora_check import check_lora
from flowmatch.models.convert.lora import LORA_FILE
from flowmatch.models.lora import LoraConfig
from flowmatch.training import train
from tests.test_train import tiny_recipe

SIZE = 32  # pixels: the digits as 32x32 RGB
PROMPTS = ["a handwritten 3", "a photo of a cat"]
EDIT_PROMPTS = ["mirror the image", "a photo of a cat"]  # the first is the edit pairs' instruction
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0
LORA = LoraConfig(rank=4, alpha=8)  # alpha != rank: a lost scale shows


@dataclasses.dataclass
class Inputs:
    """What both libraries generate from."""

    prompts: list[str]
    noise: torch.Tensor  # (B, C, h, w): the latents at t = 1, as flowmatch takes them
    guidance: float = GUIDANCE
    steps: int = STEPS
    negative: Optional[str] = None
    references: Any = None  # one reference image per prompt, as the row's `references` made them

    def ours(self) -> dict:
        """The keyword arguments of flowmatch's `Pipeline.generate`."""
        kw = dict(steps=self.steps, guidance_scale=self.guidance, noise=self.noise)
        if self.negative is not None:
            kw["negative_prompt"] = self.negative
        if self.references is not None:
            kw["images"] = self.references
        return kw


@dataclasses.dataclass(frozen=True)
class Row:
    """One family's tiny pipeline and how diffusers' pipeline class is called on :class:`Inputs`."""

    name: str
    preset: str  # its tiny preset: the recipe's family before the pipeline's transformer replaces the model section
    fixture: str  # the session fixture (tests/conftest.py) giving its pipeline folder
    pipeline_class: str  # diffusers' class, as model_index.json names it
    images: Callable[[DiffusionPipeline, Inputs], torch.Tensor]  # diffusers' images (B, 3, H, W) in [0, 1]
    #: An editing family: trained on pairs, generating from one reference image per prompt made by this.
    references: Optional[Callable[[torch.Generator], Any]] = None
    negative: Optional[str] = None  # a negative prompt for both sides (true classifier-free guidance)
    ours: dict = dataclasses.field(default_factory=dict)  # more keyword arguments of flowmatch's generate
    #: Called with (monkeypatch, flowmatch's pipeline) before either side generates: sizes both sides agree on.
    setup: Optional[Callable[[pytest.MonkeyPatch, Pipeline], None]] = None
    formats: tuple[str, ...] = ()  # export formats of the trained adapters also put through `flowmatch lora check`

    @property
    def edit(self) -> bool:
        return self.references is not None


def quiet(pipe: DiffusionPipeline, *args, **kwargs) -> torch.Tensor:
    """The images of a diffusers pipeline call at SIZE x SIZE, as (B, 3, H, W) tensors, without a progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(*args, height=SIZE, width=SIZE, output_type="pt", **kwargs).images


def _png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_edit_pairs(out: Path, count: int = 8) -> Path:
    """``count`` paired samples: a random 32x32 RGB reference, its target (the reference mirrored) and an
    instruction."""
    g = torch.Generator().manual_seed(0)
    with ShardSink(out, prefix="train", shard_size=count) as sink:
        for i in range(count):
            ref = torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8)
            sink.write(f"p{i:02d}", {"png": _png(ref.flip(-1)), reference_ext(0, "png"): _png(ref),
                                     "txt": EDIT_PROMPTS[0]})
    return out


def train_lora(pipeline: Path, run: Path, shards: Path, preset: str, *, paired: bool = False) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the pipeline's transformer, with its encoders, VAE and shift (on
    paired samples for an editing family). The model section is built in code, so it states no architecture: it
    comes from the pipeline's transformer."""
    configs = encoder_configs_from_pipeline(pipeline)
    # The train-* shards alone: no held-out split, so the last step validates without a held-out loss (seconds of
    # text encoding for a large tokenizer length; tests/test_host_syncs.py validates each family's runs with one).
    recipe = tiny_recipe(run, shards, **{
        "data.shards": str(shards / "train-*.tar"), "data.channels": 3, "data.resolution": SIZE, "data.paired": paired,
        "train.max_steps": 2, "train.batch_size": 4, "sampling.steps": 1, "model.preset": preset, "optim.lr": 0.05,
        "optim.schedule": "constant"})
    model = ModelConfig(init_from=str(pipeline), lora=LORA)
    train(dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                              autoencoder=configs.autoencoder, flow=configs.flow))
    return run


def exported(run: Path, out: Path, row: Row, pipeline: Path) -> tuple[Path, Path]:
    """The run's adapters as diffusers' LoRA file and merged into a complete pipeline folder of the row's class
    (its transformer class the source folder's): (the LoRA folder, the merged folder)."""
    lora, merged = out / "lora", out / "merged"
    assert export(run, lora, lora=True, weights="raw").files == [lora / LORA_FILE]
    summary = export(run, merged, merge=True, weights="raw")
    assert any(f"complete {row.pipeline_class} folder" in n for n in summary.notes), summary.notes
    index = json.loads((merged / "model_index.json").read_text())
    assert index["_class_name"] == row.pipeline_class
    assert index["transformer"] == json.loads((pipeline / "model_index.json").read_text())["transformer"]
    return lora, merged


def check_round_trip(row: Row, pipeline: Path, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train, export and compare (module docstring); the row's export formats through `flowmatch lora check`.

    Bugs caught: adapters exported under names diffusers does not load (load_lora_weights skips them), the scale
    alpha / rank lost or applied twice, a merged export that loses the adapters or whose encoders, VAE or pipeline
    class are not the run's, the run not reading its architecture, encoders or shift from the pipeline folder."""
    run = train_lora(pipeline, tmp_path / "run", shards, row.preset, paired=row.edit)
    recorded = read_meta(run).init_from
    assert recorded["kind"] == "diffusers" and Path(recorded["path"]) == (pipeline / "transformer").resolve()
    lora, merged_folder = exported(run, tmp_path / "out", row, pipeline)

    ours = Pipeline.from_diffusers(pipeline, device="cpu")
    if row.setup is not None:
        row.setup(monkeypatch, ours)
    g = torch.Generator().manual_seed(0)
    prompts = EDIT_PROMPTS if row.edit else PROMPTS
    noise = torch.randn(len(prompts), *ours.latent_shape(SIZE, SIZE), generator=g)
    inputs = Inputs(list(prompts), noise, negative=row.negative,
                    references=row.references(g) if row.edit else None)
    base_images = ours.generate(inputs.prompts, **inputs.ours(), **row.ours)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's own LoRA model
    if row.edit:  # the reference input comes from the pipeline's transformer
        assert ours.model.cfg.references == 1
    want = ours.generate(inputs.prompts, **inputs.ours(), **row.ours)

    theirs = getattr(diffusers, row.pipeline_class).from_pretrained(pipeline)
    theirs.load_lora_weights(lora)
    merged = DiffusionPipeline.from_pretrained(merged_folder)
    assert type(merged).__name__ == row.pipeline_class
    errors = [(row.images(pipe, dataclasses.replace(inputs, noise=noise.clone())) - want).abs().max().item()
              for pipe in (theirs, merged)]
    moved = (base_images - want).abs().max().item()
    print(f"{row.pipeline_class}: LoRA images max |diffusers - flowmatch| {errors[0]:.2e}, merged {errors[1]:.2e}; "
          f"the adapters move the images by {moved:.2e}")
    assert max(errors) < PIXEL_ATOL
    assert moved > 10 * PIXEL_ATOL  # the adapters trained enough to matter

    for fmt in row.formats:  # each export format of the trained adapters through `flowmatch lora check`
        file = export(run, tmp_path / "out" / f"lora-{fmt}", lora=True, fmt=fmt, weights="raw").files[0]
        result = check_lora(file, pipeline, prompts=PROMPTS, steps=STEPS, size=SIZE, guidance=GUIDANCE)
        print(f"{row.pipeline_class} {fmt}: reference {result.reference}, max diff {result.max_diff:.2e}, "
              f"effect {result.effect:.2e}")
        assert result.passed, result.describe()
