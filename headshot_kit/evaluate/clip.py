"""CLIP scores of a whole image, when CLIP weights can be loaded (they download on Colab).

`clip_photo_prob`: the zero-shot probability of "a photograph of a person" against digital art,
a 3D render and a painting; `clip_t_cosine`: the image-prompt cosine similarity that DreamBench
calls CLIP-T. Offline, or with `clip_model=""`, they are left out with a note saying why.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import Image

from ..config import EvaluateConfig
from ..models import hub_reachable, pick_device

REALISM_PROMPTS = ("a photograph of a person", "a digital art illustration of a person",
                   "a 3D render of a person", "a painting of a person")


class ClipScorer:
    """CLIP scores of a whole image: `clip_photo_prob`, the zero-shot probability of the first
    of REALISM_PROMPTS against the others, and `clip_t_cosine`, the image-prompt cosine
    similarity that DreamBench calls CLIP-T."""

    photo_name = "clip_photo_prob"
    prompt_name = "clip_t_cosine"

    def __init__(self, model: str, device: str) -> None:
        local_only = not Path(model).is_dir() and not hub_reachable()
        if local_only:
            # Checked before importing transformers, which alone takes seconds.
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                raise OSError("not in the local Hugging Face cache, and the hub cannot be "
                              "reached")
        from transformers import CLIPModel, CLIPProcessor

        self.device = pick_device(device)
        self.model = CLIPModel.from_pretrained(model, local_files_only=local_only)
        self.model = self.model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model, local_files_only=local_only)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def score(self, image: Image.Image, prompt: str | None) -> dict[str, float]:
        import torch

        texts = list(REALISM_PROMPTS) + ([prompt] if prompt else [])
        inputs = self.processor(text=texts, images=[image], return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_tokens).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        probs = out.logits_per_image[0, :len(REALISM_PROMPTS)].softmax(-1)
        scores = {self.photo_name: float(probs[0])}
        if prompt:
            scores[self.prompt_name] = float(torch.nn.functional.cosine_similarity(
                out.image_embeds[0], out.text_embeds[-1], dim=0))
        return scores


@lru_cache(maxsize=2)
def _load_clip(model: str, device: str) -> ClipScorer:
    return ClipScorer(model, device)


def clip_or_note(cfg: EvaluateConfig) -> tuple[ClipScorer | None, str]:
    if not cfg.clip_model:  # switched off on purpose: nothing to tell
        return None, ""
    try:
        return _load_clip(cfg.clip_model, cfg.device), ""
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"CLIP scores skipped: {cfg.clip_model!r} could not be loaded ({reason}). "
                      "On Colab it downloads by itself; offline, set clip_model to a local "
                      "folder, or to '' to skip CLIP.")
