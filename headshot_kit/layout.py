"""The work folder's layout: each stage's folder, the file that shows the stage finished writing
it, and what writes it. Standard library only: `workspace` finds the stages by it, and
`storage`'s purge recognises the workbench's folders by it."""

# The file a LoRA folder's diffusers weights are in (`pipe.load_lora_weights(folder)` reads it).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

# The workbench's tables: a pack's manifest, a training run's metrics and the experiments table
# (one row per evaluated run). Their one reader and writer each are in `records`.
MANIFEST, METRICS, EXPERIMENTS = "manifest.csv", "metrics.csv", "experiments.csv"

PHOTOS, PREPARED, LORA, HEADSHOTS, SCORES = "photos", "prepared", "lora", "headshots", "scores"
# Each stage folder and the notebook (or cell) that writes it, for "not found" messages.
MADE_BY = {PREPARED: "notebook 01_prepare", LORA: "notebook 02_finetune",
           HEADSHOTS: "notebook 03_generate", SCORES: "notebook 04_evaluate"}
# The file that shows a stage finished writing its folder.
MARKER = {PREPARED: "metadata.jsonl", LORA: LORA_WEIGHTS,
          HEADSHOTS: MANIFEST, SCORES: "scores.csv"}
