"""headshot_kit: turn 5-20 selfies into professional headshots, and measure how good they are.

Four stages, one module each, each reading the previous stage's folder and writing its own:
`prepare` (photos -> dataset), `train` (dataset -> LoRA), `generate` (LoRA -> headshots),
`evaluate` (headshots -> scores). `config` holds their settings and the named presets.
"""

__version__ = "0.1.0"

import logging as _logging


def _quiet_bitsandbytes() -> None:
    # bitsandbytes warns on every CPU import that an optional 4-bit matmul kernel (for 4-bit
    # inference, which this workbench never runs) could not be downloaded. The filter sits on
    # the logger that emits it, and drops that one message only.
    logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addFilter(lambda record: "gemm_4bit_forward" not in record.getMessage())


_quiet_bitsandbytes()
