"""bench/gpu_check.py on the CPU with the tiny models: every phase of both T4 presets runs."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_tiny_runs_every_phase(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["presets"]) == {"sd15-t4", "sdxl-t4"} and report["errors"] == []
    for preset in report["presets"].values():
        phases = {row["phase"]: row for row in preset["phases"]}
        assert list(phases) == ["build_model", "prepare", "load_and_cache", "train",
                                "validation", "checkpoint", "resume", "resume_train", "save",
                                "free", "reload_and_generate", "render", "face_pass",
                                "evaluate"]
        assert not [name for name, row in phases.items() if "error" in row]
        assert phases["resume"]["resumed_at_step"] == report["steps"]
        assert phases["reload_and_generate"]["images"] == 2
        losses = phases["train"]["losses"] + phases["resume_train"]["losses"]
        assert len(losses) == report["steps"] + report["resume_steps"]
        # The fit check's plan stands beside the phases it covers.
        for name in ("load_and_cache", "train", "validation", "resume_train"):
            assert phases[name]["predicted_allocated_gb"] > 0, name
        # The journey ETA's units are timed, the face pass on a real photo, and every phase
        # but the download stands measured beside predicted.
        assert phases["render"]["image_s"] > 0 and phases["render"]["eta_image_s"] > 0
        assert phases["face_pass"]["face_pass_s"] > 0 and phases["face_pass"]["note"]
        assert phases["evaluate"]["images"] == 2
        journey = preset["journey"]["phases"]
        assert {k for k, v in journey.items() if v["measured_scaled_s"] is None} == {
            "download", "prepare + caching"}
        assert preset["journey"]["predicted_total_min"] > 0
