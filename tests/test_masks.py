"""The face-weighted loss, end to end: prepare writes a face-and-hair mask that lines up with
each crop, the loss weighs each latent pixel by it (the hand computation, and a background the
LoRA never learns from at weight 0), and the trainer caches the weights once and hands each
micro-batch the rows of its own photos."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from headshot_kit import faces
from headshot_kit.config import ConfigError, PrepareConfig, get_preset, validate_train
from headshot_kit.families import Conditioning
from headshot_kit.faces import detect_faces, eyes_and_nose, face_mask, head_pose
from headshot_kit.prepare import prepare_photos
from headshot_kit.train import Trainer
from headshot_kit.train.loss import diffusion_loss, loss_weights, per_image_mse


def tiny(**changes):
    quick = {"steps": 2, "validate_every": 0, "checkpoint_every": 0}
    return dataclasses.replace(get_preset("tiny").train, **{**quick, **changes})


# ---------------------------------------------------------------------------------------------
# The loss


def test_weighted_loss_is_the_hand_computed_weighted_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    # Masks at twice the latent grid: image 0 has a face in its 2 x 2 centre latents, half of
    # one more latent covered; image 1 a face in its top-left latent.
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:6, 2:6] = 1.0
    mask[0, 0, 6, 2] = mask[0, 0, 7, 2] = 1.0  # half of latent (3, 1)
    mask[1, 0, 0:2, 0:2] = 1.0
    weights = loss_weights(mask, (4, 4), background_weight=0.2)

    expected = []
    for i in range(2):
        w = np.full((4, 4), 0.2)
        if i == 0:
            w[1:3, 1:3] = 1.0
            w[3, 1] = 0.2 + 0.8 * 0.5
        else:
            w[0, 0] = 1.0
        se = ((pred[i] - target[i]).numpy().astype(np.float64)) ** 2  # 4 x 4 x 4
        expected.append((w[None] * se).sum() / (4 * w.sum()))
    assert weights.shape == (2, 1, 4, 4)
    assert per_image_mse(pred, target, weights).numpy() == pytest.approx(expected, rel=1e-6)

    # Weight 1 everywhere is the plain MSE, to the bit.
    plain = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(per_image_mse(pred, target, loss_weights(mask, (4, 4), 1.0)), plain)
    assert torch.equal(per_image_mse(pred, target), plain)


class PixelDenoiser(torch.nn.Module):
    """A denoiser whose output at a pixel depends on that pixel alone (a 1 x 1 convolution),
    called as diffusers calls a UNet."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, **_):
        return SimpleNamespace(sample=self.conv(sample))


def _loss_and_lora_grads(model, latents, weights):
    from diffusers import DDPMScheduler

    model.zero_grad(set_to_none=True)
    cond = Conditioning(prompt_embeds=torch.zeros(len(latents), 1, 8))
    loss = diffusion_loss(model, DDPMScheduler(), latents, cond,
                          generator=torch.Generator().manual_seed(3), snr_gamma=5.0,
                          weights=weights)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


def test_background_at_weight_0_teaches_the_lora_nothing():
    """With background_weight 0, latents that differ only in the background give the same loss
    and the same LoRA gradient, through the train stage's own `diffusion_loss` (noise, min-SNR
    weighting and all). The denoiser is a 1 x 1 convolution: a real UNet's prediction at a face
    pixel depends on background pixels through its receptive field, so with it the background
    would still reach the gradient through the face's own error. This checks the weighting,
    which is what the mask controls."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=2, target_modules=["conv"], init_lora_weights=False),
        PixelDenoiser())
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 6, 6, generator=g)
    face = torch.zeros(2, 1, 6, 6)
    face[:, :, 1:4, 2:5] = 1.0
    other = latents + (1 - face) * torch.randn(2, 4, 6, 6, generator=g)  # background only

    face_only = loss_weights(face, (6, 6), background_weight=0.0)
    loss_a, grads_a = _loss_and_lora_grads(model, latents, face_only)
    loss_b, grads_b = _loss_and_lora_grads(model, other, face_only)
    assert grads_a and all(g.abs().sum() > 0 for g in grads_a.values())
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=0, atol=1e-7) for n in grads_a)

    # At background_weight 0.1 the same change is learnt from: the test can tell.
    some = loss_weights(face, (6, 6), background_weight=0.1)
    loss_c, grads_c = _loss_and_lora_grads(model, latents, some)
    loss_d, grads_d = _loss_and_lora_grads(model, other, some)
    assert not torch.equal(loss_c, loss_d)
    assert any(not torch.allclose(grads_c[n], grads_d[n], atol=1e-6) for n in grads_c)


def test_background_weight_outside_0_to_1_is_refused():
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match="background_weight is"):
            validate_train(tiny(background_weight=bad))
    validate_train(tiny(background_weight=0.0))


# ---------------------------------------------------------------------------------------------
# The masks prepare writes


def _mask_tilt(mask: np.ndarray) -> float:
    """Degrees between the mask's long axis (from its second moments) and the vertical."""
    w = mask.astype(np.float64) / mask.sum()
    ys, xs = np.mgrid[:mask.shape[0], :mask.shape[1]]
    dx, dy = xs - (w * xs).sum(), ys - (w * ys).sum()
    cov = [[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]]
    x, y = np.linalg.eigh(np.array(cov))[1][:, 1]
    return math.degrees(math.atan(x / y))


def _check_lines_up(crop: Image.Image, mask: Image.Image) -> faces.Face:
    """The mask is high on the eyes and nose of the face found again in the crop, and low in
    the crop's corners, which lie outside the head."""
    assert mask.mode == "L" and mask.size == crop.size
    m = np.asarray(mask)
    face = detect_faces(crop)[0]
    for x, y in eyes_and_nose(face.landmarks):
        assert m[round(y), round(x)] > 200, (x, y)
    corner = 8
    for ys in (slice(0, corner), slice(-corner, None)):
        for xs in (slice(0, corner), slice(-corner, None)):
            assert m[ys, xs].mean() < 30
    return face


def test_prepare_writes_masks_that_line_up_with_the_crops(prepared_dataset):
    entries = [json.loads(line) for line in
               (prepared_dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(entries) == 3
    for entry in entries:
        name = entry["file_name"].split("/")[-1]
        assert entry["mask"] == f"masks/{name}"
        with Image.open(prepared_dataset / entry["file_name"]) as crop, \
                Image.open(prepared_dataset / entry["mask"]) as mask:
            _check_lines_up(crop, mask)
            m = np.asarray(mask)
            # Face and hair, not the whole frame: about a third of a head-and-shoulders crop.
            assert 0.15 < m.mean() / 255 < 0.5
            # Feathered: a band of in-between weights round the head (about 9% of the crop;
            # a hard edge, only resampled, leaves under 2%).
            assert ((m > 10) & (m < 245)).mean() > 0.04


def test_the_mask_turns_with_the_photo_when_the_eyes_are_levelled(samples, tmp_path):
    tilted = Image.open(samples / "obama.jpg").convert("RGB").rotate(
        15, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    tilted.save(tmp_path / "tilted.jpg", quality=92)
    for align, out in ((False, "plain"), (True, "aligned")):
        prepare_photos([tmp_path / "tilted.jpg"], tmp_path / out,
                       PrepareConfig(resolution=256, align_roll=align))
        with Image.open(tmp_path / out / "images" / "tilted.png") as crop, \
                Image.open(tmp_path / out / "masks" / "tilted.png") as mask:
            face = _check_lines_up(crop, mask)
            roll, tilt = head_pose(face.landmarks)[1], _mask_tilt(np.asarray(mask))
            # The head's outline leans as the head does: 15 degrees, or upright once levelled.
            if align:
                assert abs(roll) < 3 and abs(tilt) < 6, (roll, tilt)
            else:
                assert abs(roll) > 12 and abs(abs(tilt) - abs(roll)) < 5, (roll, tilt)
            # Centred on the face across, the hair above it.
            centre = (np.asarray(mask, np.float64) * np.arange(crop.width)).sum() / np.asarray(
                mask, np.float64).sum()
            assert abs(centre - face.center[0]) < 0.15 * face.width


def test_a_face_without_its_68_landmarks_gets_a_mask_from_its_box(samples, monkeypatch):
    photo = Image.open(samples / "obama.jpg").convert("RGB")
    face = detect_faces(photo)[0]
    monkeypatch.setattr(faces, "_shape68", lambda: None)
    assert faces.landmarks68(photo, face) is None
    m = np.asarray(face_mask(photo, face))
    # The box's middle (its corners are the jaw's outside, where the mask fades).
    left, top, right, bottom = face.box
    dx, dy = (right - left) // 10, (bottom - top) // 10
    assert m[top + dy:bottom - dy, left + dx:right - dx].min() > 200
    for x, y in eyes_and_nose(face.landmarks):
        assert m[round(y), round(x)] == 255
    assert m[:20, :20].max() == 0 and m[-20:, -20:].max() == 0


# ---------------------------------------------------------------------------------------------
# The trainer


@pytest.fixture(scope="module")
def weighted(prepared_dataset, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads (see conftest.pipe)
    yield Trainer(prepared_dataset, tmp_path_factory.mktemp("weighted"),
                  tiny(background_weight=0.1), progress=False)
    torch.set_num_threads(threads)


def test_trainer_caches_latent_grid_weights_once(weighted, monkeypatch):
    import headshot_kit.train.setup as setup

    latents = weighted.inputs
    assert weighted.weights.shape == (len(latents), 1, *latents.shape[-2:])
    assert weighted.weights.min() == pytest.approx(0.1) and weighted.weights.max() == 1.0
    monkeypatch.setattr(setup, "mask_tensor", lambda *a: pytest.fail("masks read again"))
    for _ in range(3):
        rows, _, _, weights = weighted.batch()
        # Each row's weights are those of the photo whose latents it holds.
        (i,) = [k for k in range(len(latents)) if torch.equal(latents[k], rows[0])]
        assert torch.equal(weights[0], weighted.weights[i])
    record = weighted.train_step()
    assert math.isfinite(record["loss"])


def test_background_weight_changes_the_loss_and_1_is_the_plain_loss(weighted, prepared_dataset,
                                                                    tmp_path, capsys):
    plain = Trainer(prepared_dataset, tmp_path / "plain", tiny(background_weight=1.0),
                    progress=False)
    assert plain.weights is None
    # Fixed noise and timesteps, and the same LoRA start (same seed; B starts at 0).
    assert plain.fixed_loss() != pytest.approx(weighted.fixed_loss(), rel=1e-3)
    loss = plain.fixed_loss()

    # A dataset prepared before masks existed trains on the plain loss, and says so once.
    old = tmp_path / "old-dataset"
    shutil.copytree(prepared_dataset, old)
    shutil.rmtree(old / "masks")
    meta = old / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({k: r[k] for k in ("file_name", "text")}) + "\n"
                            for r in rows))
    capsys.readouterr()
    unmasked = Trainer(old, tmp_path / "old", tiny(background_weight=0.1), progress=False)
    said = capsys.readouterr().out
    assert said.count("no face mask for 3 of 3 photos") == 1 and "plain loss" in said
    assert unmasked.weights is None and unmasked.fixed_loss() == loss
