"""The training loop's per-step host work on the real architectures, on meta tensors: what the
CPU spends every step outside the model's kernels, before and after reading the UNet's dtype
and mode once. Writes results/bench/step_overhead.json.

The SD 1.5 and SDXL UNets are built from headshot_kit/data/arch/ on the `meta` device (shapes,
no weights), with the LoRA attached as the train stage attaches it and the frozen weights in
fp16. "before" repeats what each step did: `unet.dtype` twice per micro-batch (the loss read it
for the input and for the conditioning; diffusers walks the parameters each time) and
`.train()` on the LoRA'd model once per step (it visits every module); "after" is what the
loop does now: nothing, since both are read once. Medians of 20 repetitions; the per-step
figure multiplies by the preset's micro-batches. On a GPU the host runs this while the GPU
waits only where the host syncs; the loop now syncs once per step (the loss), so this time
also overlaps the GPU's work instead of adding to it.
"""

from __future__ import annotations

import statistics
import time

from common import write_result

REPEATS = 20


def _median_ms(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(family: str, grad_accum: int) -> dict:
    import torch

    from headshot_kit.fitcheck.measure import build_unet
    from headshot_kit.lora import add_lora

    unet = build_unet(family)
    torch.nn.Module.to(unet, torch.float16)
    add_lora(unet, 4)
    dtype_ms = _median_ms(lambda: unet.dtype)
    train_ms = _median_ms(lambda: unet.train(True))
    before = grad_accum * 2 * dtype_ms + train_ms

    class Loop:  # what Trainer keeps now: the dtype read once, the mode set once
        unet_dtype, training_mode = unet.dtype, True

    def now():
        for _ in range(grad_accum):
            Loop.unet_dtype, Loop.unet_dtype  # noqa: B018 (the two reads of a micro-batch)
        if Loop.training_mode is not True:
            unet.train(True)

    after = _median_ms(now)
    return {"family": family, "grad_accum": grad_accum,
            "modules": sum(1 for _ in unet.modules()),
            "parameters": sum(1 for _ in unet.parameters()),
            "unet_dtype_ms": round(dtype_ms, 2), "train_call_ms": round(train_ms, 2),
            "per_step_ms_before": round(before, 1), "per_step_ms_after": round(after, 4)}


def main() -> None:
    from headshot_kit.config import get_preset

    rows = [measure(p.train.family, p.train.grad_accum)
            for p in (get_preset("sd15-t4"), get_preset("sdxl-t4"))]
    # The SDXL notebook's accumulation, for comparison with its recipe.
    rows.append(measure("sdxl", 3))
    write_result("step_overhead", {"repeats": REPEATS, "rows": rows})


if __name__ == "__main__":
    main()
