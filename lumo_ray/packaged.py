"""Files shipped inside the package (lumo_ray/assets/): the product never reads outside its install."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
REAL_SAMPLES = ASSETS / "real"
"""Two real photos and two real clips with captions (provenance: assets/real/README.md)."""
DEMO_RECIPES = ASSETS / "demo"
"""The demo's per-stage settings as config files, each with its reasons (configs/demo links here)."""


def real_data_dir(path: str) -> Path:
    """audit.real_data: '' = the packaged real samples, else a folder of the same layout."""
    p = Path(path) if path else REAL_SAMPLES
    if not p.is_dir():
        raise FileNotFoundError(f"audit.real_data={path!r}: folder {p} not found (leave it empty for the packaged "
                                "real samples, or point it at a folder with llava_pretrain/images and audiocaps/audio)")
    return p
