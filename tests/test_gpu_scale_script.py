"""The GPU-scale benchmark script runs its whole code path with tiny shapes on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"


def test_gpu_scale_script_tiny_offload(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--offload", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["kind"] == "gpu-scale" and row["offload"] is True
    assert row["params_kept"] <= 0.5
    assert set(row["stages"]) == {"capture", "analyse", "allocate", "prune"}
    assert "total" in result.stdout
