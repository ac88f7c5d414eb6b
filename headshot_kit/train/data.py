"""The training data: the prepared dataset's photos, captions and face masks, the subject words
it records, and the class images of prior preservation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import models
from ..config import DEFAULT_CLASS, DEFAULT_TOKEN, ConfigError, DataError, TrainConfig, agree
from ..images import centre_square, list_images, load_image
from ..storage import atomic_path, read_record


@dataclass
class TrainExample:
    image: Path
    caption: str
    # The photo's face-and-hair mask ('L', lined up with the image); None in a dataset prepared
    # before the prepare stage wrote masks.
    mask: Path | None = None


def load_dataset(data_dir: str | Path) -> list[TrainExample]:
    """The (image, caption) pairs of a prepared dataset folder."""
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: {data_dir} is not a prepared dataset. Run "
                                "the prepare stage first (notebook 01 or `headshot-kit prepare`).")
    examples = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            mask = data_dir / row["mask"] if row.get("mask") else None
            examples.append(TrainExample(data_dir / row["file_name"], row["text"], mask))
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"{meta}, line {n}: expected JSON with 'file_name' and 'text' "
                             f"({exc}). Re-run the prepare stage.") from None
    missing = [path for e in examples for path in (e.image, e.mask)
               if path is not None and not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} lists files that are missing: "
                                f"{', '.join(map(str, missing[:3]))}. Re-run the prepare stage.")
    if not examples:
        raise DataError(f"{meta} lists no images: every photo was rejected. Read "
                        f"{data_dir / 'report.csv'} for why, add usable photos and run the "
                        "prepare stage again.")
    return examples


def dataset_fingerprint(data_dir: str | Path, examples: list[TrainExample]) -> str:
    """A fingerprint of what a run learns from: the captions file, every photo and face mask
    it lists (their bytes) and the subject words; other photos give another fingerprint."""
    import hashlib

    data_dir = Path(data_dir)
    digest = hashlib.sha256((data_dir / "metadata.jsonl").read_bytes())
    digest.update(" ".join(dataset_subject(data_dir)).encode())
    for e in examples:
        for path in (e.image, e.mask):
            if path is not None:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def dataset_subject(data_dir: str | Path) -> tuple[str, str]:
    """The token and class noun the prepare stage recorded in the dataset's config.json."""
    path = Path(data_dir) / "config.json"
    recorded = read_record(path)
    return recorded.get("token", DEFAULT_TOKEN), recorded.get("class_name", DEFAULT_CLASS)


def with_dataset_subject(cfg: TrainConfig, data_dir: str | Path) -> TrainConfig:
    """`cfg` with the subject words and class prompt of the dataset; a setting that names other
    words is refused (captions, validation and generation must all say the same thing)."""
    token, class_name = dataset_subject(data_dir)
    source = Path(data_dir) / "config.json"
    fix = ", or prepare the photos again with the token and class_name you want"
    subject = agree("TrainConfig.subject", cfg.subject, f"{token} {class_name}", source, fix)
    class_prompt = cfg.class_prompt or f"a photo of a {class_name}"
    # A class noun of several words ("young woman") must appear whole, word for word.
    if f" {' '.join(class_name.split())} " not in f" {' '.join(class_prompt.split())} ":
        raise ConfigError(f"TrainConfig.class_prompt {class_prompt!r} does not name the class "
                          f"{class_name!r} that {source} records; leave class_prompt unset, or "
                          f"write one with {class_name!r} in it.")
    return dataclasses.replace(cfg, subject=subject, class_prompt=class_prompt)


def image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """A photo as a (3, H, W) tensor in [-1, 1], centre-cropped and resized to `resolution`."""
    image = centre_square(load_image(path), resolution)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def mask_tensor(path: Path, resolution: int) -> torch.Tensor:
    """A face mask as a (1, H, W) tensor in [0, 1], cropped and resized as `image_tensor` does
    its photo, so the two still line up."""
    with Image.open(path) as im:
        mask = centre_square(im.convert("L"), resolution)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def class_image_dir(cfg: TrainConfig) -> Path:
    if cfg.class_dir:
        return Path(cfg.class_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.model)
    prompt = "".join(c if c.isalnum() else "_" for c in cfg.class_prompt)[:40]
    return models.cache_dir() / "class_images" / f"{safe}-{cfg.resolution}px-{prompt}"


def ensure_class_images(pipe, cfg: TrainConfig, progress: bool = True) -> list[Path]:
    """The prior-preservation images, generated by the base model the first time only."""
    folder = class_image_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    have = list_images(folder)
    missing = cfg.num_class_images - len(have)
    if missing > 0:
        for i in tqdm(range(len(have), cfg.num_class_images), desc="class images",
                      disable=not progress):
            image = pipe(cfg.class_prompt, num_inference_steps=cfg.class_image_steps,
                         height=cfg.resolution, width=cfg.resolution,
                         generator=torch.Generator().manual_seed(10_000 + i)).images[0]
            with atomic_path(folder / f"class_{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
    return list_images(folder)[: cfg.num_class_images]
