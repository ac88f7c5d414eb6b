"""A text-encoder LoRA written by the train stage loads back with diffusers' own
`load_lora_weights` and changes the text encoder exactly as the trained one did, under names
that transformers 4 and 5 both resolve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from headshot_kit import models
from headshot_kit.config import get_preset
from headshot_kit.families import tokenize
from headshot_kit.lora import ui_weights
from headshot_kit.train import Trainer

PROMPT = "a photo of ohwx person"


def encode(pipe, name: str = "text_encoder") -> torch.Tensor:
    encoder = getattr(pipe, name)
    tokenizer = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
    with torch.no_grad():
        return encoder(tokenize(tokenizer, [PROMPT]))[0].float()


@pytest.fixture(scope="module")
def trained(prepared_dataset, tmp_path_factory):
    # A high learning rate moves the text encoder's LoRA far from its zero start in 6 steps.
    cfg = dataclasses.replace(get_preset("tiny").train, steps=6, lr=2e-2,
                              train_text_encoder=True, validate_every=0, checkpoint_every=0)
    trainer = Trainer(prepared_dataset, tmp_path_factory.mktemp("te-lora"), cfg,
                      progress=False)
    result = trainer.run()
    trainer.pipe.text_encoder.eval()
    return trainer, result


def test_text_encoder_keys_carry_the_text_model_level(trained):
    _, result = trained
    keys = [k for k in load_file(str(result.lora_path)) if k.startswith("text_encoder.")]
    assert keys
    # transformers 4's CLIPTextModel path; diffusers strips it where transformers 5 has none.
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys), keys[:3]
    kohya = load_file(str(ui_weights(result.out_dir)))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert not [k for k in kohya if "text_model_text_model" in k]


def test_reloaded_text_encoder_lora_changes_the_encoder_as_in_memory(trained):
    trainer, result = trained
    in_memory = encode(trainer.pipe)

    fresh = models.load_pipeline("tiny-sd15")
    base = encode(fresh)
    fresh.load_lora_weights(str(result.out_dir))
    loaded = encode(fresh)

    assert (in_memory - base).abs().max() > 1e-3  # the LoRA really moved the encoder
    torch.testing.assert_close(loaded, in_memory, atol=1e-5, rtol=1e-4)


def test_adapter_metadata_is_a_config_older_loaders_rebuild(trained):
    """diffusers 0.35 indexes `rank_pattern` in the stored config, and peft 0.17 refuses
    fields it does not know: the file stores the fields every release reads, and no others."""
    import json

    from peft import LoraConfig
    from safetensors import safe_open

    _, result = trained
    with safe_open(str(result.lora_path), "pt") as f:
        stored = json.loads(f.metadata()["lora_adapter_metadata"])
    unet = {k.removeprefix("unet."): v for k, v in stored.items() if k.startswith("unet.")}
    assert unet["r"] == 4 and unet["lora_alpha"] == 4 and unet["rank_pattern"] == {}
    assert set(unet["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert set(unet) <= {"r", "lora_alpha", "target_modules", "lora_dropout", "rank_pattern",
                         "alpha_pattern", "use_dora", "use_rslora", "bias"}
    LoraConfig(**unet)  # rebuilds as a loader does
