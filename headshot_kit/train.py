"""Fine-tune: teach a diffusion model one face with a DreamBooth-style LoRA.

Reads the prepare stage's folder (`metadata.jsonl` + images), trains a peft LoRA on the UNet's
attention projections, and writes a diffusers-format `pytorch_lora_weights.safetensors` with
`config.json`, `metrics.csv` and a loss curve. accelerate handles the device and precision;
bitsandbytes' 8-bit AdamW keeps the optimizer state at one byte per value, which is what lets
training fit a free Colab T4 (REFERENCE: 9.92 GB with 8-bit Adam vs 15.79 GB without).

What makes it fit and stay stable, each a known failure on Colab:
- VAE latents and text embeddings are computed once; the VAE and text encoder then leave the GPU.
- Trainable LoRA weights stay in fp32 while the frozen model is fp16 ("Attempting to unscale
  FP16 gradients" otherwise).
- bitsandbytes failing to load is detected and explained, and training falls back to torch AdamW
  with the memory cost stated.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import models
from .config import ConfigError, TrainConfig, save_config, validate_train
from .images import load_image

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class TrainExample:
    image: Path
    caption: str


@dataclass
class TrainResult:
    out_dir: Path
    lora_path: Path
    metrics: pd.DataFrame
    optimizer: str  # the optimizer that actually ran, e.g. "bitsandbytes AdamW8bit"
    seconds: float

    def plot(self):
        from .images import plot_loss

        return plot_loss(self.metrics, title=f"Training loss ({self.optimizer})")


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
            examples.append(TrainExample(data_dir / row["file_name"], row["text"]))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{meta}, line {n}: expected JSON with 'file_name' and 'text' "
                             f"({exc}). Re-run the prepare stage.") from None
    missing = [e.image for e in examples if not e.image.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} lists images that are missing: "
                                f"{', '.join(map(str, missing[:3]))}. Re-run the prepare stage.")
    if not examples:
        raise ValueError(f"{meta} lists no images: every photo was rejected. Read the prepare "
                         "stage's report.csv and add usable photos.")
    return examples


def image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """A photo as a (3, H, W) tensor in [-1, 1], centre-cropped and resized to `resolution`."""
    image = load_image(path)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize(
        (resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def make_optimizer(params, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' AdamW8bit when asked for and loadable, else torch AdamW with a warning."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.adam_weight_decay,
                                      min_8bit_size=cfg.optimizer_min_8bit_size)
            return opt, "bitsandbytes AdamW8bit"
        except Exception as exc:  # bitsandbytes fails in many ways when CUDA libraries move
            warnings.warn(
                f"bitsandbytes could not load ({type(exc).__name__}: {exc}); training with torch "
                "AdamW instead. Its optimizer state takes 8 bytes per trainable value instead "
                "of 2: small for a LoRA, about 6 GB more for a full SD 1.5 UNet. Fix: "
                "`pip install -U bitsandbytes` and restart the runtime.", stacklevel=2)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.adam_weight_decay), "torch AdamW"


def optimizer_state_dtypes(optimizer: torch.optim.Optimizer) -> set[torch.dtype]:
    """The dtypes of every tensor the optimizer keeps as state (uint8 for 8-bit Adam)."""
    return {v.dtype for state in optimizer.state.values() for v in state.values()
            if torch.is_tensor(v) and v.numel() > 1}


def add_lora(unet, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach a fresh peft LoRA to the UNet; return its (fp32) trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"target_modules {cfg.target_modules} matched no UNet layer; use the "
                          "attention projections ('to_q', 'to_k', 'to_v', 'to_out.0').")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet LoRA weights in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, folder: Path, cfg: TrainConfig) -> Path:
    """Write the LoRA where diffusers' `load_lora_weights` finds it, with its rank and alpha."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if cfg.family == "sdxl" else StableDiffusionPipeline
    metadata = {"r": cfg.rank, "lora_alpha": cfg.lora_alpha,
                "target_modules": list(cfg.target_modules)}
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in lora_state_dict(unet).items()}
    cls.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return folder / LORA_WEIGHTS


def encode_prompts(pipe, captions: list[str], device: str) -> torch.Tensor:
    """Text-encoder hidden states for each caption (SD 1.5 conditioning)."""
    tokens = pipe.tokenizer(captions, padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids.to(device))[0]


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


def diffusion_loss(unet, noise_scheduler, latents, conditioning, *, generator=None,
                   noise=None, timesteps=None) -> torch.Tensor:
    """The denoising loss of one batch: MSE between the UNet's prediction and its target."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(
            latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=conditioning.to(
        unet.dtype)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


def fixed_batch_loss(unet, noise_scheduler, latents, conditioning, seed: int = 1234,
                     repeats: int = 8) -> float:
    """Mean loss over fixed noise and timesteps: comparable before and after training."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for _ in range(repeats):
            losses.append(float(diffusion_loss(unet, noise_scheduler, latents, conditioning,
                                               generator=generator)))
    return float(np.mean(losses))


class Trainer:
    """One LoRA training run, in steps, so notebooks can watch it and tests can probe it."""

    def __init__(self, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler

        self.cfg = validate_train(cfg)
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.examples = load_dataset(self.data_dir)
        device = models.pick_device(cfg.device)
        dtype = models.pick_dtype(device, cfg.mixed_precision)
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu",
                                       gradient_accumulation_steps=cfg.grad_accum)
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.pipe = models.load_pipeline(cfg.model, cfg.family, device=str(self.device),
                                         dtype=dtype)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.latents, self.conditioning = self._cache_inputs()
        unet = self.pipe.unet
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = add_lora(unet, cfg)
        self.n_trainable = sum(p.numel() for p in params)
        optimizer, self.optimizer_name = make_optimizer(params, cfg)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            unet, optimizer, lr_scheduler)
        self.params = params
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []

    def _cache_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every caption (and, with cache_latents, every photo) once.

        With everything cached, the VAE and text encoder leave the GPU for the whole run.
        Without it the photos stay as pixels and pass through the VAE at every step.
        """
        pipe, res = self.pipe, self.cfg.resolution
        pixels = torch.stack([image_tensor(e.image, res) for e in self.examples])
        conditioning = encode_prompts(pipe, [e.caption for e in self.examples],
                                      str(self.device)).float()
        if not self.cfg.cache_latents:
            return pixels.to(self.device), conditioning.to(self.device)
        latents = torch.cat([encode_latents(pipe, pixels[i:i + 4])
                             for i in range(0, len(pixels), 4)]).float()
        if self.device.type != "cpu":
            pipe.vae.to("cpu")
            pipe.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        return latents.to(self.device), conditioning.to(self.device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.latents), (self.cfg.batch_size,),
                            generator=self.generator).to(self.latents.device)
        latents = self.latents[idx]
        if not self.cfg.cache_latents:
            latents = encode_latents(self.pipe, latents).float()
        return latents, self.conditioning[idx]

    def train_step(self) -> float:
        """One optimizer step (with its accumulated micro-batches); returns the mean loss."""
        losses = []
        self.unet.train()
        for _ in range(self.cfg.grad_accum):
            with self.accelerator.accumulate(self.unet):
                latents, conditioning = self.batch()
                with self.accelerator.autocast():
                    loss = diffusion_loss(self.unet, self.noise_scheduler, latents,
                                          conditioning, generator=self.generator)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.step += 1
        loss = float(np.mean(losses))
        self.history.append({"step": self.step, "loss": loss,
                             "lr": self.lr_scheduler.get_last_lr()[0]})
        return loss

    def fixed_loss(self) -> float:
        """The loss on every photo with fixed noise and timesteps (see `fixed_batch_loss`)."""
        self.unet.eval()
        latents = self.latents
        if not self.cfg.cache_latents:
            latents = encode_latents(self.pipe, latents).float()
        return fixed_batch_loss(self.unet, self.noise_scheduler, latents, self.conditioning)

    def run(self, progress: bool = True) -> TrainResult:
        start = time.perf_counter()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", disable=not progress)
        while self.step < self.cfg.steps:
            loss = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.history[-1]['lr']:.2e}")
        bar.close()
        return self.save(time.perf_counter() - start)

    def save(self, seconds: float = 0.0) -> TrainResult:
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.unet)
        lora_path = save_lora(unet, out, self.cfg)
        metrics = pd.DataFrame(self.history, columns=["step", "loss", "lr"])
        metrics.to_csv(out / "metrics.csv", index=False)
        save_config(self.cfg, out / "config.json", data_dir=str(self.data_dir),
                    optimizer_used=self.optimizer_name, trainable_parameters=self.n_trainable,
                    n_images=len(self.examples), seconds=round(seconds, 2))
        result = TrainResult(out, lora_path, metrics, self.optimizer_name, seconds)
        if len(metrics):
            fig = result.plot()
            fig.savefig(out / "loss.png", dpi=100)
            import matplotlib.pyplot as plt

            plt.close(fig)
        return result


def train_lora(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None,
               progress: bool = True) -> TrainResult:
    """Train a LoRA on the prepared photos in `data_dir`; write it and its records to `out_dir`."""
    trainer = Trainer(data_dir, out_dir, cfg or TrainConfig())
    print(f"Training a rank-{trainer.cfg.rank} LoRA ({trainer.n_trainable:,} parameters) on "
          f"{len(trainer.examples)} photos for {trainer.cfg.steps} steps on "
          f"{trainer.device.type}, optimizer: {trainer.optimizer_name}.")
    return trainer.run(progress=progress)
