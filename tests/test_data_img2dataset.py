"""img2dataset output as it is: the real img2dataset downloads from a local server, and training reads its folder."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.serve import ShardServer
from flowmatch.data import build_loader, expand_shards
from flowmatch.data.config import DataConfig


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 255, (24 + 8 * (i % 3), 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        (folder / f"img{i}.jpg").write_bytes(buffer.getvalue())
        names.append(f"img{i}.jpg")
    return names


def run_img2dataset(url_list: Path, out: Path) -> None:
    """The command the README documents, with one process and no progress bar."""
    code = (
        "from img2dataset import download; "
        f"download(url_list={str(url_list)!r}, input_format='csv', url_col='url', caption_col='caption', "
        f"output_format='webdataset', output_folder={str(out)!r}, image_size=16, resize_mode='center_crop', "
        "processes_count=1, thread_count=2, number_sample_per_shard=4, timeout=5, retries=0, "
        "enable_wandb=False, disallowed_header_directives=[])"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


@pytest.mark.slow  # a real training run
def test_training_reads_img2dataset_output_as_it_is(tmp_path):
    from flowmatch.training import train
    from tests.test_train import tiny_recipe

    images = write_images(tmp_path / "images", 7)
    with ShardServer(tmp_path / "images") as server:
        url_list = tmp_path / "urls.csv"
        with url_list.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for i, name in enumerate(images):
                writer.writerow([server.url(name), f"a random picture number {i}"])
            writer.writerow([server.url("gone.jpg"), "a picture that is not there"])  # a failed download
        out = tmp_path / "out"
        run_img2dataset(url_list, out)
    files = sorted(p.name for p in out.iterdir())
    assert any(f.endswith(".parquet") for f in files) and any(f.endswith("_stats.json") for f in files)
    assert all(u.endswith(".tar") for u in expand_shards(str(out)))  # the parquet and stats files are not shards

    cfg = DataConfig(shards=str(out), prepare="", resolution=8, channels=3, num_workers=0)
    batches = list(build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=0, epochs=1))
    seen = {meta["url"].rsplit("/", 1)[1]: (caption, meta)
            for b in batches for caption, meta in zip(b.captions, b.meta)}
    assert sorted(seen) == sorted(images)  # every image once; the failed one simply absent
    for name, (caption, meta) in seen.items():
        assert caption == f"a random picture number {name[3:-4]}" and meta["status"] == "success"
        assert meta["caption"] == caption and meta["width"] == 16
    assert all(b.images.shape[1:] == (3, 8, 8) for b in batches)

    summary = train(tiny_recipe(tmp_path / "run", out, **{"data.channels": 3, "train.max_steps": 2}))
    assert summary.final_step == 2
