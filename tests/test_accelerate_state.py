"""accelerate keeps one state per process and refuses another precision later in the same
process; each training run starts from a fresh one (train.setup.fresh_accelerator), through
accelerate's private reset, which has no public equivalent: this checks that it still works."""

from __future__ import annotations

import pytest
import torch

from headshot_kit.train.setup import fresh_accelerator


def test_a_second_run_in_the_same_process_may_change_precision():
    from accelerate import Accelerator

    assert fresh_accelerator(torch.bfloat16, "cpu").mixed_precision == "bf16"
    # What a notebook retrying a diverged bf16 run in fp32 would meet without the reset.
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="no", cpu=True)
    assert fresh_accelerator(torch.float32, "cpu").mixed_precision == "no"
    assert fresh_accelerator(torch.bfloat16, "cpu").mixed_precision == "bf16"
    assert fresh_accelerator(torch.float32, "cpu").mixed_precision == "no"
