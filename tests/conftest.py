"""Tests never reach a model hub: everything they load is made on the spot or shipped in a package."""

import collections
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


# The tiny diffusers pipelines (tests/tiny_pipelines.py). Defined here, not imported into each test module: a
# fixture imported into several modules is a separate fixture in each, built again for every one of them.
@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory):
    """Folder of a tiny random SD3-medium-layout pipeline (see tests/tiny_pipelines.py), built once per session."""
    from tests.tiny_pipelines import save_sd3_pipeline  # imports diffusers: only for the tests that ask for it

    return save_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd35_pipeline(tmp_path_factory):
    """Folder of a tiny random SD3.5-medium-layout pipeline (MMDiT-X, QK-norm; tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import save_sd3_pipeline  # imports diffusers: only for the tests that ask for it

    return save_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3.5-medium"), kind="sd3.5-medium")


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory):
    """Folder of a tiny random FLUX.1-dev-layout pipeline (see tests/tiny_pipelines.py), built once per session."""
    from tests.tiny_pipelines import save_flux_pipeline  # imports diffusers: only for the tests that ask for it

    return save_flux_pipeline(tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="session")
def tiny_qwen_pipeline(tmp_path_factory):
    """Folder of a tiny random QwenImagePipeline (see tests/tiny_pipelines_qwen.py), built once per session."""
    from tests.tiny_pipelines_qwen import save_qwen_pipeline  # imports diffusers: only for the tests that ask for it

    return save_qwen_pipeline(tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_lumina2_pipeline(tmp_path_factory):
    """Folder of a tiny random Lumina2Pipeline (tests/tiny_pipelines_lumina2.py), built once per session."""
    from tests.tiny_pipelines_lumina2 import save_lumina2_pipeline  # imports diffusers: only for the tests that ask

    return save_lumina2_pipeline(tmp_path_factory.mktemp("tiny-lumina2"))


@pytest.fixture(scope="session")
def tiny_qwen_edit_pipeline(tmp_path_factory):
    """Folder of a tiny random QwenImageEditPipeline (tests/tiny_pipelines_qwen.py), built once per session."""
    from tests.tiny_pipelines_qwen import save_qwen_edit_pipeline  # imports diffusers: only for the tests that ask

    return save_qwen_edit_pipeline(tmp_path_factory.mktemp("tiny-qwen-image-edit"))


@pytest.fixture(scope="session")
def tiny_zimage_pipeline(tmp_path_factory):
    """Folder of a tiny random ZImagePipeline (see tests/tiny_pipelines_zimage.py), built once per session."""
    from tests.tiny_pipelines_zimage import save_zimage_pipeline  # imports diffusers: only for the tests that ask

    return save_zimage_pipeline(tmp_path_factory.mktemp("tiny-zimage"))


@pytest.fixture(scope="session")
def tiny_kontext_pipeline(tmp_path_factory):
    """Folder of a tiny random FLUX.1 Kontext [dev] pipeline (see tests/tiny_pipelines_kontext.py), built once per
    session."""
    from tests.tiny_pipelines_kontext import save_kontext_pipeline  # imports diffusers: only for the tests that ask

    return save_kontext_pipeline(tmp_path_factory.mktemp("tiny-flux-kontext"))


@pytest.fixture(scope="session")
def tiny_chroma_pipeline(tmp_path_factory):
    """Folder of a tiny random Chroma pipeline (see tests/tiny_pipelines_chroma.py), built once per session."""
    from tests.tiny_pipelines_chroma import save_chroma_pipeline  # imports diffusers: only for the tests that ask

    return save_chroma_pipeline(tmp_path_factory.mktemp("tiny-chroma"))


@pytest.fixture(scope="session")
def tiny_flux2_pipeline(tmp_path_factory):
    """Folder of a tiny random FLUX.2 [klein] pipeline (see tests/tiny_pipelines_flux2.py), built once per session."""
    from tests.tiny_pipelines_flux2 import save_flux2_pipeline  # imports diffusers: only for the tests that ask

    return save_flux2_pipeline(tmp_path_factory.mktemp("tiny-flux2"))


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
