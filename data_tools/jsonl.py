"""`flowmatch-data jsonl FILE OUT`: rows of {"image": path or URL, "caption": text} -> shards.

Accepted field names: image / url / path for the image, caption / text for the caption; other fields are kept
in the sample's .json. Relative paths are relative to FILE's folder. URLs (http, https) are fetched with a
timeout and a size cap, a few at a time. Bad rows (unparsable, missing fields, unreachable or undecodable
images) are skipped and listed in OUT/report.json, like the folder tool.

Paired (editing) rows: a `reference` field (`--reference-field`) names the reference image(s), a path or URL or a
list of them (read as the image is); they are stored as `ref.EXT`, `ref_1.EXT`, ... (flowmatch.data.shardformat)
and the caption is the instruction. A row whose reference cannot be read or decoded is skipped and reported.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

from data_tools.images import REFERENCE_FIELD, ImageRejected, check_image, reference_files, reference_sources
from data_tools.report import BuildReport
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, MIB, ShardSink

IMAGE_FIELDS = ("image", "url", "path")
CAPTION_FIELDS = ("caption", "text")
FETCH_TIMEOUT_S = 30
URL_SCHEMES = ("http://", "https://")


def parse_rows(path: Path, report: BuildReport) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each usable line; the rest are reported."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line)
            except ValueError as err:
                report.skip(where, f"not JSON ({err})")
                continue
            if not isinstance(row, dict):
                report.skip(where, "row is not an object")
                continue
            yield number, row


def field_of(row: dict, names: tuple[str, ...]) -> Optional[str]:
    """The first of `names` present as a non-empty string."""
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def fetch(source: str, base: Path) -> bytes:
    """Image bytes from a URL or a path (relative to base); OSError/ValueError on failure."""
    if source.startswith(URL_SCHEMES):
        request = urllib.request.Request(source, headers={"User-Agent": "flowmatch-data"})
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise ValueError(f"download larger than {MAX_MEMBER_BYTES // MIB} MiB")
        return data
    if "://" in source:
        raise ValueError("only http(s) URLs and local paths are supported")
    path = base / source
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise ValueError(f"file larger than {MAX_MEMBER_BYTES // MIB} MiB")
    return path.read_bytes()


def build_jsonl(file: str | Path, out: str | Path, *, shard_size: int = 1000, threads: int = 8,
                max_pixels: int = MAX_IMAGE_PIXELS, overwrite: bool = False,
                reference_field: str = REFERENCE_FIELD) -> BuildReport:
    """Write the shards and OUT/report.json; returns the report."""
    file, out = Path(file), Path(out)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    report = BuildReport()
    jobs = []
    for number, row in parse_rows(file, report):
        image, caption = field_of(row, IMAGE_FIELDS), field_of(row, CAPTION_FIELDS)
        where = f"{file.name}:{number}"
        if image is None or caption is None:
            report.skip(where, "row without image" if image is None else "row without caption")
            continue
        try:
            references = reference_sources(row, reference_field)
        except ValueError as err:
            report.skip(where, str(err))
            continue
        jobs.append((number, where, image, caption, row, references))

    def load(job: tuple) -> tuple[tuple, Optional[bytes], list[bytes], str]:
        try:
            data = fetch(job[2], file.parent)
        except (OSError, ValueError) as err:
            return job, None, [], f"unreadable image ({type(err).__name__}: {err})"
        try:
            return job, data, [fetch(source, file.parent) for source in job[5]], ""
        except (OSError, ValueError) as err:
            return job, None, [], f"unreadable reference ({type(err).__name__}: {err})"

    with ShardSink(out, prefix="shard", shard_size=shard_size, overwrite=overwrite) as sink, \
            ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for (number, where, image, caption, row, _), data, references, error in pool.map(load, jobs):  # in order
            if data is None:
                report.skip(where, error)
                continue
            try:
                ext = check_image(data, max_pixels=max_pixels)
                refs = reference_files(references, max_pixels=max_pixels)
            except ImageRejected as err:
                report.skip(where, str(err))
                continue
            extra = {k: v for k, v in row.items() if k not in IMAGE_FIELDS + CAPTION_FIELDS}
            meta = json.dumps({"source": image, **extra}, ensure_ascii=False)
            sink.write(f"row-{number:09d}", {ext: data, "txt": caption, **refs, "json": meta})
            report.written += 1
    report.shards = [p.name for p in sink.paths]
    report.save(out / "report.json")
    return report
