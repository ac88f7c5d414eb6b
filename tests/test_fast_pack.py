"""Fast packs: a few-step LoRA stacked on the face LoRA through diffusers' multi-adapter API,
with its authors' sampler, steps and guidance. The hub's LCM-LoRA cannot be downloaded here:
a second LoRA built locally for the tiny model stands in for it, loaded by the same code."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_lora

from headshot_kit import generate as gen
from headshot_kit.config import ConfigError, GenerateConfig, get_preset
from headshot_kit import fastpacks as fast
from headshot_kit.lora import LORA_WEIGHTS


@pytest.fixture(scope="module")
def local_pack(pipe, tmp_path_factory):
    """The lcm-lora pack pointed at a locally built LoRA (another seed than the face's)."""
    folder = make_lora(pipe, tmp_path_factory.mktemp("fast") / "lcm", seed=7)
    real = fast.FAST_PACKS["lcm-lora"]
    local = dataclasses.replace(real, sources={"sd15": (str(folder), LORA_WEIGHTS)})
    with pytest.MonkeyPatch.context() as m:
        m.setitem(fast.FAST_PACKS, "lcm-lora", local)
        yield local


def shot(cfg, lora_dir, seed=0):
    styles = gen.load_styles()
    return gen.make_shot(cfg, styles["corporate"], seed, lora_dir)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_the_real_packs_name_their_hub_loras_and_prescribed_sampling():
    pack = fast.FAST_PACKS["lcm-lora"]
    assert pack.sources["sdxl"] == ("latent-consistency/lcm-lora-sdxl",
                                    "pytorch_lora_weights.safetensors")
    assert pack.sources["sd15"][0] == "latent-consistency/lcm-lora-sdv1-5"
    assert (pack.scheduler, pack.steps, pack.guidance) == ("lcm", 4, 1.0)
    with pytest.raises(ConfigError, match="fast_pack is 'turbo'"):
        fast.get_fast_pack("turbo")


def test_a_fast_pack_shot_takes_the_packs_sampler_steps_and_guidance(lora_dir):
    cfg = dataclasses.replace(get_preset("tiny").generate, fast_pack="lcm-lora", steps=20,
                              guidance=7.0)
    s = shot(cfg, lora_dir)
    assert (s.fast_pack, s.scheduler, s.steps, s.guidance) == ("lcm-lora", "lcm", 4, 1.0)
    assert "Fast pack: lcm-lora" in s.parameters() and "Sampler: LCM" in s.parameters()


def test_the_pack_stacks_on_the_face_lora_and_comes_off_again(pipe, lora_dir, local_pack):
    cfg = dataclasses.replace(get_preset("tiny").generate, steps=4)
    face_only = shot(dataclasses.replace(cfg, scheduler="lcm", guidance=1.0), lora_dir)
    stacked = shot(dataclasses.replace(cfg, fast_pack="lcm-lora"), lora_dir)
    # Same sampler, steps and guidance: only the second adapter differs.
    assert dataclasses.replace(stacked, fast_pack="") == face_only
    before = gen.render(face_only, pipe)
    with_pack = gen.render(stacked, pipe)
    active = pipe.get_active_adapters()
    assert len(active) == 2 and local_pack.adapter_name in active
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert np.abs(pixels(with_pack) - pixels(before)).mean() > 1
    # Off again: the face LoRA alone, the same pixels as before the pack was loaded.
    again = gen.render(face_only, pipe)
    assert pipe.get_active_adapters() == [a for a in active if a != local_pack.adapter_name]
    assert np.array_equal(pixels(again), pixels(before))


def test_a_pack_on_the_base_model_alone(pipe, local_pack):
    cfg = dataclasses.replace(get_preset("tiny").generate, fast_pack="lcm-lora")
    gen.render(shot(cfg, None), pipe)
    assert pipe.get_active_adapters() == [local_pack.adapter_name]


def test_a_manifest_row_brings_the_pack_back(pipe, lora_dir, local_pack, tmp_path):
    cfg = dataclasses.replace(get_preset("tiny").generate, fast_pack="lcm-lora")
    s = shot(cfg, lora_dir)
    image = gen.render(s, pipe)
    gen.save_png(image, tmp_path / "a.png", s)
    row = gen.read_parameters(tmp_path / "a.png") | {"style": s.style, "family": "sd15"}
    again = gen.shot_from_row(row, lora_dir)
    assert again.fast_pack == "lcm-lora"
    assert np.array_equal(pixels(gen.render(again, pipe)), pixels(image))


def test_fast_pack_is_a_sweep_axis():
    from headshot_kit.sweep import plan_runs

    runs = plan_runs("tiny", {"fast_pack": ["none", "lcm-lora"]})
    assert [p.generate.fast_pack for _, _, p in runs] == ["none", "lcm-lora"]
    styles = gen.load_styles()
    assert [gen.make_shot(p.generate, styles["corporate"], 0, None).fast_pack
            for _, _, p in runs] == ["", "lcm-lora"]


def test_the_estimate_says_the_pack_is_faster():
    cfg = get_preset("sdxl-t4").generate
    full = gen.t4_estimate(cfg, 40)
    quick = gen.t4_estimate(dataclasses.replace(cfg, fast_pack="lcm-lora"), 40)
    minutes = [int(t.split("about ")[1].split(" min")[0]) for t in (full, quick)]
    assert minutes[1] < minutes[0] / 2 and "lcm-lora" in quick
    assert isinstance(GenerateConfig().fast_pack, str)
