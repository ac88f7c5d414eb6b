"""The journey ETA: each phase's formula tied to the figure it rests on, the T4 presets inside
the services' promise (15 minutes with SD 1.5, 45 with SDXL), and the measured times written
beside the predicted ones.

Calibration points (fitted, so they agree by construction) and evidence (held out) are told
apart in each test's name and comment; the README lists both.
"""

from __future__ import annotations

import json

import pytest

from headshot_kit.cli import main
from headshot_kit.config import get_preset
from headshot_kit.fitcheck import eta as E
from headshot_kit.fitcheck import published as P
from headshot_kit.fitcheck.gpus import GB, GPUS, T4_CALIBRATION

T4 = GPUS["t4"]


def fitcheck_json(preset: str, capsys) -> dict:
    main(["fitcheck", "--preset", preset, "--gpu", "t4", "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("preset", "promise"), [("sd15-t4", 15), ("sdxl-t4", 45)])
def test_fitcheck_json_carries_an_eta_inside_the_promise(preset, promise, capsys):
    eta = fitcheck_json(preset, capsys)["eta"]
    assert eta["total_minutes"] <= promise, eta
    assert {"download", "loads", "training", "validation", "images", "face pass",
            "evaluate"} <= set(eta["phases"])
    assert eta["total_minutes"] == pytest.approx(sum(eta["phases"].values()), abs=0.05)
    # Training is the fit check's own step time times the steps.
    plan = json.loads(json.dumps(fitcheck_json(preset, capsys)))
    steps = get_preset(preset).train.steps
    assert eta["phase_seconds"]["training"] == pytest.approx(steps * plan["step_seconds"],
                                                             rel=0.01)


def test_the_sampling_rate_is_sd1x_published_4_7_its_calibration_point():
    # Calibration: sampling_overhead_s is fitted on diffusers#1050's 4.7 it/s at 512 px.
    assert E.sampling_step_seconds("sd15", 512, True) == pytest.approx(1 / P.SD15_T4_ITS,
                                                                       rel=0.01)
    assert P.calibrate().sampling_overhead_s == pytest.approx(
        T4_CALIBRATION.sampling_overhead_s, rel=0.01)


def test_an_sdxl_image_is_within_20_percent_of_the_published_26_5_s_evidence():
    # Evidence (not fitted): the LCM-LoRA blog's standard SDXL render on a T4, 25 steps with
    # guidance, decoded by the stock VAE, which upcasts to fp32. The model says about 28 s.
    (steps, published), = P.SDXL_T4_IMAGE_S.items()
    predicted = (steps * E.sampling_step_seconds("sdxl", 1024, True)
                 + E.vae_seconds("sdxl", 1024, decode=True, fp32=True))
    assert predicted == pytest.approx(published, rel=0.20)


def test_the_fast_pack_image_is_the_blogs_8_4_s_calibration_point():
    # Calibration: what the FLOP count leaves unexplained of the blog's 4-step LCM-LoRA image
    # (8.4 s) is a per-image cost of the fast pack; the model alone would say about 3.7 s.
    (steps, published), = P.SDXL_T4_LCM_IMAGE_S.items()
    alone = (steps * E.sampling_step_seconds("sdxl", 1024, False)
             + E.vae_seconds("sdxl", 1024, decode=True, fp32=True))
    assert alone < 0.6 * published
    assert alone + E.fast_pack_image_seconds("sdxl", 1024) == pytest.approx(published,
                                                                            rel=0.01)


def test_each_phase_is_its_formula(monkeypatch):
    p = get_preset("sdxl-t4")
    eta = E.journey_eta(p)
    t, g = p.train, p.generate
    weights = 2 * sum(E.parameter_counts("sdxl").values())
    assert weights / GB == pytest.approx(6.94, rel=0.02)  # fp16 UNet + VAE + both encoders
    assert eta.phases["download"] == pytest.approx(weights / E.HUB_BYTES_PER_S)
    assert eta.phases["loads"] == pytest.approx(2 * weights / E.LOAD_BYTES_PER_S)
    step = E.sampling_step_seconds("sdxl", 1024, True)
    decode = E.vae_seconds("sdxl", 1024, decode=True)
    n_images = len(g.styles) * len(g.seeds)
    assert n_images == 40
    # The preset's decode runs whole (tiles_decode): 20 steps and one untiled decode each.
    assert eta.phases["images"] == pytest.approx(n_images * (g.steps * step + decode))
    face_steps = int(g.steps * g.face_detail_strength)
    encode = E.vae_seconds("sdxl", 1024, decode=False)
    assert eta.phases["face pass"] == pytest.approx(
        n_images * (face_steps * step + encode + decode))
    renders = (t.steps // t.validate_every) * len(t.validation_prompts) * len(
        t.validation_seeds)
    assert eta.phases["validation"] == pytest.approx(
        renders * (t.validation_steps * step + decode + E.DLIB_S))
    # REFERENCE: dlib detect + describe, about 0.2 s a photo.
    assert E.DLIB_S == 0.2
    assert eta.phases["evaluate"] == pytest.approx((n_images + E.PHOTOS) * E.DLIB_S)


def test_a_tiled_decode_works_through_9_tiles_and_1_56x_the_pixels():
    assert E.tile_factor(1024, 512) == pytest.approx(1.5625)
    assert E.tile_factor(512, 512) == 1.0
    tiled = E.vae_seconds("sdxl", 1024, decode=True, tiled_at=512)
    assert tiled == pytest.approx(1.5625 * E.vae_seconds("sdxl", 1024, decode=True))


def test_the_untiled_decode_allowance_is_twice_the_measured_peak():
    from headshot_kit.fitcheck.measure import measure_vae
    from headshot_kit.generate.shots import UNTILED_DECODE_BYTES_1024, tiles_decode

    peak = measure_vae("sdxl", 1024, 1, half=True, decode=True).peak
    assert UNTILED_DECODE_BYTES_1024 == pytest.approx(2 * peak, rel=0.05)
    # With the SDXL pipeline on a T4 the decode runs whole; on a nearly full GPU in tiles.
    assert E.decode_tile(get_preset("sdxl-t4").generate, T4) == 0
    assert tiles_decode("sdxl", 1024, 1e9) == 512
    assert tiles_decode("sd15", 512, 0) == 0


def test_a_fast_pack_cuts_the_render_phases():
    p = get_preset("sdxl-t4")
    full = E.journey_eta(p)
    p.generate.fast_pack = "lcm-lora"
    fast = E.journey_eta(p)
    assert fast.phases["images"] < full.phases["images"] / 2
    assert "lcm-lora" in fast.formulas["images"]
    assert fast.phases["training"] == full.phases["training"]


def test_write_eta_puts_measured_beside_predicted(tmp_path):
    eta = E.Eta("Tesla T4", {"download": 60.0, "loads": 30.0, "images": 100.0,
                             "face pass": 50.0}, {k: "" for k in
                                                  ("download", "loads", "images", "face pass")})
    path = E.write_eta(tmp_path, eta, {"download + loads": 95.0,
                                       "images + face pass": 170.0})
    data = json.loads(path.read_text())
    assert data["phases"]["images + face pass"] == {"predicted_s": 150.0, "measured_s": 170.0}
    assert data["phases"]["download + loads"] == {"predicted_s": 90.0, "measured_s": 95.0}
    assert data["phases"]["images"] == {"predicted_s": 100.0, "measured_s": None}
    assert data["predicted_total_s"] == 240.0 and data["measured_total_s"] == 265.0
