"""Tests never reach a model hub: everything they load is made on the spot or shipped in a package."""

import collections
import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process unless the caller says otherwise: xdist runs one worker per core, and workers
# of two threads each spin against each other on the same cores (the fast tier took 225 s instead of 82 s on the
# quiet 2-core machine). Launched runs take OMP_NUM_THREADS=1 too (tests/launching.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402 - after the environment above, which must be set before anything imports transformers
import torch  # noqa: E402
import torch.nn.attention.flex_attention as flex  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also where torch was imported before this file


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Lets FlexAttention run its backward pass on CPU, so tests can compare flex's gradients with SDPA's: torch
    refuses CPU inputs that need gradients up front (its compiled CPU kernel has no backward), while the eager dense
    implementation it would run computes them."""
    monkeypatch.setattr(flex, "_validate_device", lambda query, key, value: None)


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """The digits shards (train-*.tar and val-*.tar), built once per test session."""
    from data_tools.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


@pytest.fixture(scope="session")
def digit_edit_shards(tmp_path_factory):
    """The paired digits-edit shards (a reference digit, "add K", the target digit), built once per test session:
    the data of an editing family (one whose ``capabilities.references`` is above 0)."""
    from data_tools.digits_edit import write_digits_edit

    out = tmp_path_factory.mktemp("digits-edit")
    write_digits_edit(out)
    return out


# The tiny diffusers pipelines (tests/tiny_pipelines*.py), one session fixture each, all made by one factory.
# Defined here, not imported into each test module: a fixture imported into several modules is a separate fixture
# in each, built again for every one of them.
def tiny_pipeline(name: str, module: str, save: str, folder: str, layout: str, **kwargs):
    """The session fixture ``name``: the folder of a tiny random ``layout`` that
    ``tests/<module>.py::<save>(path, **kwargs)`` writes under a temporary ``folder``, built once per session (per
    xdist worker)."""

    def fixture(tmp_path_factory):
        # reason: the builders import diffusers, which only the sessions that ask for a pipeline pay for
        save_pipeline = getattr(importlib.import_module(f"tests.{module}"), save)
        return save_pipeline(tmp_path_factory.mktemp(folder), **kwargs)

    fixture.__name__ = name
    fixture.__doc__ = f"Folder of a tiny random {layout} (tests/{module}.py), built once per session."
    return pytest.fixture(scope="session", name=name)(fixture)


tiny_sd3_pipeline = tiny_pipeline("tiny_sd3_pipeline", "tiny_pipelines", "save_sd3_pipeline", "tiny-sd3",
                                  "SD3-medium-layout pipeline")
tiny_sd35_pipeline = tiny_pipeline("tiny_sd35_pipeline", "tiny_pipelines", "save_sd3_pipeline",
                                   "tiny-sd3.5-medium", "SD3.5-medium-layout pipeline (MMDiT-X, QK-norm)",
                                   kind="sd3.5-medium")
tiny_flux_pipeline = tiny_pipeline("tiny_flux_pipeline", "tiny_pipelines", "save_flux_pipeline", "tiny-flux-dev",
                                   "FLUX.1-dev-layout pipeline")
tiny_qwen_pipeline = tiny_pipeline("tiny_qwen_pipeline", "tiny_pipelines_qwen", "save_qwen_pipeline",
                                   "tiny-qwen-image", "QwenImagePipeline")
tiny_qwen_edit_pipeline = tiny_pipeline("tiny_qwen_edit_pipeline", "tiny_pipelines_qwen", "save_qwen_edit_pipeline",
                                        "tiny-qwen-image-edit", "QwenImageEditPipeline")
tiny_lumina2_pipeline = tiny_pipeline("tiny_lumina2_pipeline", "tiny_pipelines_lumina2", "save_lumina2_pipeline",
                                      "tiny-lumina2", "Lumina2Pipeline")
tiny_zimage_pipeline = tiny_pipeline("tiny_zimage_pipeline", "tiny_pipelines_zimage", "save_zimage_pipeline",
                                     "tiny-zimage", "ZImagePipeline")
tiny_kontext_pipeline = tiny_pipeline("tiny_kontext_pipeline", "tiny_pipelines_kontext", "save_kontext_pipeline",
                                      "tiny-flux-kontext", "FLUX.1 Kontext [dev] pipeline (FluxKontextPipeline)")
tiny_chroma_pipeline = tiny_pipeline("tiny_chroma_pipeline", "tiny_pipelines_chroma", "save_chroma_pipeline",
                                     "tiny-chroma", "ChromaPipeline")
tiny_flux2_pipeline = tiny_pipeline("tiny_flux2_pipeline", "tiny_pipelines_flux2", "save_flux2_pipeline",
                                    "tiny-flux2", "FLUX.2 [klein] pipeline (Flux2KleinPipeline)")


@pytest.fixture(scope="session")
def train_runs(tmp_path_factory, digit_shards):
    """The real training launches of tests/test_train_distributed.py, each started on first use and shared by the
    modules that compare with them (tests/test_launchers.py follows its one-process run): each costs seconds."""
    from test_train_distributed import Runs  # the module beside this file (tests/ is on sys.path)

    return Runs(tmp_path_factory.mktemp("train-runs"), digit_shards)



# pytest-xdist (`-n logical --dist loadfile` in pyproject.toml): each worker is a process with its own session
# fixtures and its own tmp directory. A module's tests stay on one worker (its module fixtures are built once), and
# the modules that share an expensive session fixture of launched runs share a worker (the runs launch once).
SHARED_WORKER = {  # module -> the worker group it joins
    "tests/test_train_distributed.py": "train_runs",
    "tests/test_launchers.py": "train_runs",
    "tests/test_preemption.py": "train_runs",
}


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return SHARED_WORKER.get(module, module)


def pytest_collection_modifyitems(config, items):
    """Groups with the most slow tests first (xdist hands groups out in this order, `--no-loadscope-reorder`): a
    launch-heavy module started last would leave the other workers idle while it runs."""
    slow = collections.Counter(_group(item.nodeid) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[_group(item.nodeid)])  # stable: the order within a group is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the modules of :data:`SHARED_WORKER` on one worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # reason: an optional plugin; this hook runs only under it

    class ModuleGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ModuleGroups(config, log)
