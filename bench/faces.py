"""Which face finder: dlib's HOG detector or OpenCV zoo's YuNet, on real photos.

Every sample photo (the same files as the test fixtures; each shows one face) at its own size,
downscaled to 512, 256 and 128 px on its long side (a 512 px render, a small selfie, a face of
about 20 px as in a full-body render), and at 512 px tilted by 25 and 45 degrees: for
each detector, the photos where the face was found (a box around where the photo's face is:
its centre at full size, found by YuNet, carried through the scaling and the turn), other
detections, and the median milliseconds per photo. HOG is run as the workbench runs it: without
upsampling, then with 1x upsampling when nothing was found. Also the box HOG draws, in units of
YuNet's box, on the photos both find (faces.HOG_FROM_YUNET). Writes results/bench/faces.json.
"""

from __future__ import annotations

import math
import statistics

from common import ROOT, timed, write_result

from PIL import Image

# None: the photo's own size; "512 tilted N": 512 px turned N degrees in the picture plane.
SIZES = (None, 512, 256, 128, "512 tilted 25", "512 tilted 45")
REPEATS = 3


def where(image: Image.Image, side, centre: tuple[float, float]) -> tuple[float, float]:
    """Where the point `centre` of the full-size `image` lands in its `scaled` variant."""
    if side is None:
        return centre
    small = scaled(image, 512 if isinstance(side, str) else side)
    x, y = (c * small.width / image.width for c in centre)
    if not isinstance(side, str):
        return x, y
    angle = math.radians(int(side.split()[-1]))  # PIL turns anticlockwise about the centre
    turned = scaled(image, side)
    dx, dy = x - small.width / 2, y - small.height / 2
    return (math.cos(angle) * dx + math.sin(angle) * dy + turned.width / 2,
            -math.sin(angle) * dx + math.cos(angle) * dy + turned.height / 2)


def scaled(image: Image.Image, side: int | None) -> Image.Image:
    if side is None:
        return image
    if isinstance(side, str):
        return scaled(image, 512).rotate(int(side.split()[-1]), resample=Image.Resampling.BICUBIC,
                                         expand=True)
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.LANCZOS)


def hog(image: Image.Image):
    from headshot_kit import faces

    return faces.detect_faces_hog(image, upsample=1, max_side=1024)


def main() -> None:
    from headshot_kit import faces
    from headshot_kit.images import load_image

    photos = sorted(p for p in (ROOT / "data" / "samples" / "photos").iterdir()
                    if p.suffix.lower() in (".jpg", ".png"))
    finders = {"hog": hog, "yunet": faces.detect_faces_yunet}
    # Each photo's face at full size (every finder finds it there: see the first rows).
    centres = {p.name: faces.detect_faces_yunet(load_image(p))[0].center for p in photos}
    rows, box_units = [], []
    for side in SIZES:
        for name, finder in finders.items():
            found, extra, times, missed = 0, 0, [], []
            for path in photos:
                full = load_image(path)
                x, y = where(full, side, centres[path.name])
                image = scaled(full, side)
                seconds, _, result = timed(lambda: finder(image), REPEATS)
                times.append(seconds * 1000)
                hits = [f for f in result
                        if f.box[0] <= x <= f.box[2] and f.box[1] <= y <= f.box[3]]
                found += bool(hits)
                extra += len(result) - bool(hits)
                if not hits:
                    missed.append(path.name)
            rows.append({"size": side or "original", "detector": name, "photos": len(photos),
                         "found": found, "extra": extra, "missed": missed,
                         "ms_median": round(statistics.median(times), 1)})
        if side is None:
            for path in photos:
                image = load_image(path)
                h, y = hog(image), faces.detect_faces_yunet(image)
                if h and y and y[0].box[0] > 0:  # a face cut by the frame says nothing
                    (l, t, r, b), (hl, ht, hr, hb) = y[0].box, h[0].box
                    w, ht_ = r - l, b - t
                    box_units.append([(hl - l) / w, (ht - t) / ht_, (hr - l) / w,
                                      (hb - t) / ht_])
    medians = [round(statistics.median(u[k] for u in box_units), 3) for k in range(4)]
    write_result("faces", {"rows": rows, "hog_box_in_yunet_units_median": medians})
    print("\n| photos | detector | faces found | extra | ms per photo |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['detector']} | {r['found']}/{r['photos']} | {r['extra']} | "
              f"{r['ms_median']:.0f} |")


if __name__ == "__main__":
    main()
