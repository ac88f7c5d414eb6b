"""Prepare-stage speed on phone-sized photos: 20 photos of 12 MP (4032x3024, the most common
phone camera size) through `prepare_photos` end to end. Writes results/bench/prepare.json.

The photos are the sample photos enlarged and varied (mirrored, re-lit, portrait and landscape)
into a temporary folder. The target is under 15 s for 20 photos on 2 cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import ROOT, peak_rss_mb, timed, write_result

from PIL import Image, ImageEnhance, ImageOps

N_PHOTOS, REPEATS = 20, 3
PHONE = (3024, 4032)  # 12 MP, portrait
SAMPLES = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def make_photos(folder: Path) -> list[Path]:
    paths = []
    for i in range(N_PHOTOS):
        photo = ROOT / "data" / "samples" / "photos" / SAMPLES[i % len(SAMPLES)]
        image = Image.open(photo).convert("RGB")
        size = PHONE if i % 5 else PHONE[::-1]  # every fifth photo in landscape
        # Top-anchored cover crop: the sample faces sit in the upper part of the frame.
        image = ImageOps.fit(image, size, Image.Resampling.BICUBIC, centering=(0.5, 0.0))
        if i % 2:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Brightness(image).enhance(0.85 + 0.03 * (i % 10))
        path = folder / f"IMG_{1000 + i}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    from headshot_kit.faces import _dlib
    from headshot_kit.prepare import prepare_photos

    _dlib()  # load the face models outside the timing, as a notebook session would
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos = make_photos(folder)
        megabytes = sum(p.stat().st_size for p in photos) / 2**20
        median, times, result = timed(lambda: prepare_photos(folder, Path(tmp) / "dataset"),
                                      repeats=REPEATS)
    write_result("prepare", {
        "photos": N_PHOTOS, "photo_size": "x".join(map(str, PHONE)),
        "input_mb": round(megabytes, 1), "resolution": 512,
        "median_s": round(median, 2), "s_per_photo": round(median / N_PHOTOS, 3),
        "times_s": [round(t, 2) for t in times], "used": result.n_used,
        "peak_rss_mb": round(peak_rss_mb(), 1), "target_s": 15,
    })


if __name__ == "__main__":
    main()
