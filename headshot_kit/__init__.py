"""headshot_kit: turn 5-20 selfies into professional headshots, and measure how good they are.

Four stages, one module each, each reading the previous stage's folder and writing its own:
`prepare` (photos -> dataset), `train` (dataset -> LoRA), `generate` (LoRA -> headshots),
`evaluate` (headshots -> scores). `config` holds their settings and the named presets.
"""

__version__ = "0.1.0"
