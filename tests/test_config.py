"""The recipe tree: loading, precedence, presets, base files and the errors users see."""

from pathlib import Path

import pytest

from flowmatch.config import Recipe, RecipeError, load_recipe, recipe_from_yaml, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_neutral_and_the_digits_job_lives_in_its_recipe():
    default, digits = Recipe(), load_recipe(ROOT / "recipes" / "digits.yaml")
    assert (default.model.preset, default.text_encoder.kind, default.autoencoder.kind) == ("sd3-medium", "t5", "vae")
    assert not any("digit" in p for p in default.sampling.prompts)
    assert (digits.model.preset, digits.text_encoder.kind, digits.autoencoder.kind) == ("digits", "auto", "identity")
    assert digits.sampling.prompts[7] == "a handwritten digit seven" and digits.sampling.per_prompt == 8


def test_a_base_cycle_is_a_recipe_error_naming_the_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  max_steps: 3\n")
    with pytest.raises(RecipeError, match=r"cycle: \S*a\.yaml -> \S*b\.yaml -> \S*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(RecipeError, match=r"cycle: \S*self\.yaml -> \S*self\.yaml"):
        load_recipe(tmp_path / "self.yaml")


def test_defaults_are_no_task_and_the_digits_recipe_names_its_own():
    default, digits = Recipe(), load_recipe(ROOT / "recipes" / "digits.yaml")
    assert (default.data.prepare, default.data.resolution, default.data.channels, default.eval.task) == (
        "", 256, 3, "generic")
    assert (digits.data.shards, digits.data.prepare, digits.data.resolution, digits.data.channels) == (
        "data/digits", "digits", 8, 1)
    assert digits.eval.task == "digits"


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  max_steps: 50\n  seed: 3\n")
    r = load_recipe(path, ["train.max_steps=7", "distributed.zero_stage=2", "data.shards=/tmp/s/{000..003}.tar"])
    assert r.train.max_steps == 7  # command line beats the file
    assert r.train.seed == 3  # the file beats the default
    assert r.train.batch_size == Recipe().train.batch_size  # default
    assert r.distributed.zero_stage == 2 and r.data.shards == "/tmp/s/{000..003}.tar" and r.run_dir == "runs/x"


def test_model_preset_then_recipe_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  preset: sd3-medium\n  depth: 2\n")
    r = load_recipe(path)
    assert r.model.preset == "sd3-medium" and r.model.depth == 2 and r.model.num_heads == 24
    assert load_recipe(path, ["model.preset=tiny"]).model.depth == 2  # the file's depth still applies


def test_base_file_is_merged_underneath(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 10\n  seed: 5\noptim:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 20\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.train.max_steps, r.train.seed, r.optim.lr) == (20, 5, 0.5)


def test_resolved_yaml_round_trips():
    r = load_recipe(None, ["model.depth=3", "optim.betas=[0.9, 0.95]", "data.resolution=[8, 16]"])
    again = recipe_from_yaml(to_yaml(r))
    assert again == r and again.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_step=5", "Did you mean 'train.max_steps'"),
        ("trian.max_steps=5", "Did you mean 'train'"),
        ("train.max_steps=five", "train.max_steps: expected an integer"),
        ("train.compile=maybe", "train.compile: expected true or false"),
        ("flow.time_dist=logitnormal", "did you mean 'logit_normal'"),
        ("model.preset=sd3-mediun", "did you mean 'sd3-medium'"),
        ("distributed.zero_stage=4", "zero_stage"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("train.max_steps", "section.key=value"),
    ],
)
def test_bad_keys_types_and_values_name_the_problem(override, expected):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(None, [override])


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["train.batchsize=4"])
    assert "batch_size" in str(err.value) and "max_steps" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        load_recipe(path)
