"""The GPU path, proven on the CPU: what CUDA changes is emulated, the rest is the real code.

- a T4's and an A100's compute capability, through a patched `torch.cuda`;
- accelerate under fp16 as on a GPU: prepare() wraps the UNet's forward in fp16 autocast with
  fp32 outputs, over an fp16 frozen model (the tiny models run fp16 on the CPU), and a loss
  scaler (torch's GradScaler, which also runs on the CPU) scales backward and may skip steps;
- a bitsandbytes whose native library fails at the first step, as 0.50 defers it;
- a GPU device for the moves between GPU and CPU around validation.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from headshot_kit import fitcheck, models
from headshot_kit.config import (PRODIGY_LR, PRODIGY_WEIGHT_DECAY, ConfigError, TrainConfig,
                                 get_preset, validate_train, with_optimizer_defaults)
from headshot_kit.lora import peft_state, ui_weights
from headshot_kit.train import Trainer, train_lora, usage_snippet


def tiny(**changes):
    quick = {"steps": 2, "validate_every": 0, "checkpoint_every": 0}
    return dataclasses.replace(get_preset("tiny").train, **{**quick, **changes})


def emulate_cuda_fp16(monkeypatch, **scaler_kwargs) -> None:
    """Accelerator(mixed_precision="fp16") on the CPU made to do what it does on a GPU."""
    import accelerate

    class CudaLikeAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.state.mixed_precision == "fp16":
                # What accelerate sets up for fp16 on CUDA and skips on the CPU.
                self.native_amp = True
                self.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", CudaLikeAccelerator)


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda as a process with that GPU sees it; is_bf16_supported answers as torch does
    on any CUDA card, emulation included: True."""
    # Imported for real first: libraries that see CUDA at import reach for its kernels.
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    props = type("Props", (), {"total_memory": 15 * 2**30 if "T4" in name else 40 * 2**30})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)


# ---------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("name, capability, precision", [
    ("Tesla T4", (7, 5), "fp16"), ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16")])
def test_auto_precision_follows_the_gpu_and_the_fit_check_agrees(monkeypatch, name, capability,
                                                                 precision):
    fake_gpu(monkeypatch, name, capability)
    assert models.pick_dtype("cuda", "auto") == models.PRECISION_DTYPES[precision]
    plan = fitcheck.check_before_training(TrainConfig())
    assert plan.dtype == precision
    # Asked for explicitly, a precision is kept, bf16 only where the GPU has it; the CPU
    # stays fp32.
    assert models.pick_dtype("cuda", "fp16") == torch.float16
    assert models.pick_dtype("cpu", "auto") == torch.float32
    if precision == "fp16":
        with pytest.raises(ConfigError, match="without bf16"):
            models.pick_dtype("cuda", "bf16")
    else:
        assert models.pick_dtype("cuda", "bf16") == torch.bfloat16


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_validation_renders_under_fp16_mixed_precision(monkeypatch, prepared_dataset, tmp_path,
                                                       family):
    emulate_cuda_fp16(monkeypatch)
    cfg = tiny(mixed_precision="fp16", model=f"tiny-{family}", family=family)
    trainer = Trainer(prepared_dataset, tmp_path, cfg, progress=False)
    assert trainer.pipe.vae.dtype == torch.float16 and trainer.accelerator.native_amp
    # SDXL's fp16-fix VAE does not upcast itself: the pipeline decodes in its fp16.
    trainer.pipe.vae.register_to_config(force_upcast=False)
    trainer.train_step()
    grid = trainer.validate()
    assert (tmp_path / "validation.png").is_file() and grid.width > 0
    assert len(trainer.validation_rows[0][1]) == len(trainer.cfg.validation_prompts)


def test_validation_leaves_text_encoder_lora_on_the_gpu(monkeypatch, prepared_dataset,
                                                        tmp_path):
    trainer = Trainer(prepared_dataset, tmp_path, tiny(train_text_encoder=True),
                      progress=False)
    trainer.device = torch.device("cuda")  # as on a GPU, where the VAE waits on the CPU
    moves = []
    for name in ("vae", "text_encoder"):
        module = getattr(trainer.pipe, name)
        monkeypatch.setattr(module, "to", lambda device, _n=name, _m=module: (
            moves.append((_n, str(device))), _m)[1])
    trainer.validate()
    # The VAE came to the GPU to decode and went back; the text encoder, whose LoRA and
    # optimizer state live on the GPU, never moved.
    assert moves == [("vae", "cuda"), ("vae", "cpu")]


def test_text_encoder_checkpointing_runs_while_training(prepared_dataset, tmp_path):
    trainer = Trainer(prepared_dataset, tmp_path, tiny(train_text_encoder=True,
                                                       gradient_checkpointing=True),
                      progress=False)
    encoder = trainer.pipe.text_encoder
    layer = next(m for name, m in encoder.named_modules() if name.endswith("layers.0"))
    calls = []
    real = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    lora = [p for p in encoder.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in lora]
    trainer.train_step()
    assert calls, "the text encoder ran without gradient checkpointing"
    # ...and its LoRA still learned through the recomputed layers.
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))
    trainer.fixed_loss()
    assert not trainer.pipe.text_encoder.training  # eval mode again for measuring


# ---------------------------------------------------------------------------------------------
# Runs in one kernel


def test_second_run_in_another_precision(prepared_dataset, tmp_path):
    fp32 = train_lora(prepared_dataset, tmp_path / "fp32", tiny(steps=1, mixed_precision="no"),
                      progress=False)
    result = train_lora(prepared_dataset, tmp_path / "bf16",
                        tiny(steps=1, mixed_precision="bf16"), progress=False)
    assert result.metrics["loss"].notna().all()
    # It trained in bf16: the same photo, noise and timestep give fp32's loss up to bf16's
    # rounding, not bit for bit.
    loss, loss_fp32 = result.metrics["loss"][0], fp32.metrics["loss"][0]
    assert loss != loss_fp32 and abs(loss - loss_fp32) < 0.05 * loss_fp32, (loss, loss_fp32)
    # The step moved the LoRA (its up-projections start at zero), and the file holds it in
    # the fp32 it trained in.
    weights = load_file(str(result.lora_path))
    ups = [v for k, v in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and {v.dtype for v in weights.values()} == {torch.float32}
    assert all(float(v.abs().max()) > 0 for v in ups)


def test_failed_run_lets_go_of_its_models(prepared_dataset, tmp_path):
    held = []

    def fail(trainer, record):
        held.append(weakref.ref(trainer.pipe.unet))
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory") as failure:
        train_lora(prepared_dataset, tmp_path, tiny(), progress=False, on_step=fail)
    # A notebook keeps the exception and its traceback, as `failure` does here.
    assert failure.traceback
    gc.collect()
    assert held and held[0]() is None, "the failed run's UNet is still alive"


# ---------------------------------------------------------------------------------------------
# The fp16 loss scaler


def test_fp16_resume_continues_the_loss_scale(monkeypatch, prepared_dataset, tmp_path):
    # A scale that overflows fp16 every few steps, so that its state decides which steps count.
    emulate_cuda_fp16(monkeypatch, init_scale=1e6, growth_interval=2)
    cfg = tiny(steps=10, mixed_precision="fp16", lr_scheduler="linear")
    whole = Trainer(prepared_dataset, tmp_path / "whole", cfg, progress=False)
    whole_result = whole.run()
    whole_scale = whole.accelerator.scaler.get_scale()

    cut = Trainer(prepared_dataset, tmp_path / "cut", cfg, progress=False)
    for _ in range(6):
        cut.train_step()
    cut.save_checkpoint()
    cut.close()

    resumed = Trainer(prepared_dataset, tmp_path / "cut", cfg, progress=False)
    assert resumed.step == 6
    result = resumed.run()
    skipped = whole_result.metrics["skipped"]
    # Overflowed steps are recorded as skipped (their loss was finite) and change nothing.
    assert 0 < skipped.sum() < 10
    assert whole_result.metrics.loc[skipped, "loss"].notna().all()
    assert list(result.metrics["skipped"]) == list(skipped)
    assert resumed.accelerator.scaler.get_scale() == whole_scale
    a, b = peft_state(whole.pipe.unet), peft_state(resumed.pipe.unet)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


# ---------------------------------------------------------------------------------------------
# bitsandbytes


def test_8bit_optimizer_failing_at_its_first_step_falls_back(monkeypatch, prepared_dataset,
                                                              tmp_path):
    import bitsandbytes as bnb  # a declared dependency: a broken install fails here

    class BrokenAdamW8bit(bnb.optim.AdamW8bit):
        def step(self, closure=None):  # bitsandbytes 0.50 loads its library only here
            raise RuntimeError("libbitsandbytes_cuda128.so: cannot open shared object file")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", BrokenAdamW8bit)
    with pytest.warns(UserWarning, match="bitsandbytes could not load.*cannot open"):
        trainer = Trainer(prepared_dataset, tmp_path, tiny(), progress=False)
    assert trainer.optimizer_name == "torch AdamW"
    assert trainer.run().metrics["loss"].notna().all()


def test_resume_into_another_optimizer_is_refused_in_a_sentence(monkeypatch, prepared_dataset,
                                                                 tmp_path):
    """A run whose bitsandbytes failed fell back to torch AdamW; resumed once bitsandbytes
    works, the same settings would load AdamW state into AdamW8bit (KeyError: 'state1')."""
    import bitsandbytes as bnb

    working = bnb.optim.AdamW8bit

    class BrokenAdamW8bit(working):
        def step(self, closure=None):
            raise RuntimeError("libbitsandbytes_cuda128.so: cannot open shared object file")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", BrokenAdamW8bit)
    with pytest.warns(UserWarning, match="bitsandbytes could not load"):
        first = Trainer(prepared_dataset, tmp_path, tiny(), progress=False)
    assert first.optimizer_name == "torch AdamW"
    first.train_step()
    first.save_checkpoint()
    monkeypatch.setattr(bnb.optim, "AdamW8bit", working)
    with pytest.raises(ConfigError, match="torch AdamW state") as err:
        Trainer(prepared_dataset, tmp_path, tiny(), progress=False)
    assert "\n" not in str(err.value) and "checkpoint_dir" in str(err.value)
    # Asking for another optimizer outright is named as the changed setting.
    with pytest.raises(ConfigError, match="optimizer 'adamw8bit' \\(now 'adamw'\\)"):
        Trainer(prepared_dataset, tmp_path, tiny(optimizer="adamw"), progress=False)


# ---------------------------------------------------------------------------------------------
# What users get


def test_generation_slices_the_vae_decode_on_a_gpu(monkeypatch):
    from headshot_kit.generate import load_generate_pipeline

    tiny_pipe = models.load_pipeline("tiny-sd15")
    monkeypatch.setattr(models, "pick_device", lambda requested="auto": "cuda")
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: tiny_pipe)
    pipe = load_generate_pipeline(get_preset("sd15-t4").generate)
    assert pipe.vae.use_slicing  # what pick_batch_size's per-image figure assumes


@pytest.mark.parametrize("preset", ["sd15-t4", "sdxl-t4"])
def test_model_card_loads_the_fp16_files_onto_the_gpu(preset):
    code = usage_snippet(get_preset(preset).train, "lora")
    assert 'torch_dtype=torch.float16, variant="fp16"' in code and '.to("cuda")' in code
    assert ("sdxl-vae-fp16-fix" in code) == (preset == "sdxl-t4")
    compile(code, "snippet", "exec")


def test_kohya_metadata_names_rank_and_alpha(prepared_dataset, tmp_path):
    result = Trainer(prepared_dataset, tmp_path, tiny(steps=1, rank=2, alpha=8),
                     progress=False).run()
    with safe_open(str(ui_weights(result.out_dir)), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 8


def test_prodigy_gets_its_own_lr_and_weight_decay():
    cfg = with_optimizer_defaults(validate_train(TrainConfig(optimizer="prodigy")))
    assert (cfg.lr, cfg.adam_weight_decay) == (PRODIGY_LR, PRODIGY_WEIGHT_DECAY)
    kept = with_optimizer_defaults(TrainConfig(optimizer="prodigy", lr=0.5,
                                               adam_weight_decay=0.0))
    assert (kept.lr, kept.adam_weight_decay) == (0.5, 0.0)
    assert with_optimizer_defaults(TrainConfig()).lr == TrainConfig.lr  # AdamW untouched
    with pytest.raises(ConfigError, match="lr=1.0"):
        validate_train(dataclasses.replace(get_preset("sdxl-t4").train, optimizer="prodigy"))
