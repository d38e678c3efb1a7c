"""benchmarks/gpu.py runs on a GPU machine only when one is lent: its smoke mode runs every section here first."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_section_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--images", "100",
                             "--workdir", str(tmp_path / "work"), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    sections = ("environment", "extraction", "finetune", "torchrun", "onnxruntime")
    assert set(sections) <= set(report)
    for name in sections:
        assert "error" not in report[name], (name, report[name])
    extraction = report["extraction"]
    assert extraction["images"] == 100 and extraction["images_small_run"] == 20
    assert extraction["end_to_end_steady_images_per_second"] > 0
    assert extraction["model_only_float32_images_per_second"] > 0
    finetune = report["finetune"]
    assert {"cache_then_images", "images_then_cache"} <= set(finetune) and finetune["cache_speedup"] > 0
    assert report["torchrun"]["same_rows"] and report["torchrun"]["same_fingerprint"]
    onnx = report["onnxruntime"]
    assert onnx["provider"] == "cpu" and onnx["max_probability_diff_vs_cpu_provider"] == 0
