"""The benchmark scripts share benchmarks/common.py instead of importing each other, and
benchmarks/RESULTS.md is exactly what ``run.py --render`` makes of the committed rows."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_benchmark_script_imports_another_or_edits_sys_path():
    assert len(SCRIPTS) >= 9
    script_names = {p.stem for p in SCRIPTS}
    for path in SCRIPTS:
        assert not _imported_modules(path) & script_names, path.name
        assert "sys.path" not in path.read_text(encoding="utf-8"), path.name


def test_results_md_is_what_the_renderer_makes_of_the_committed_rows(tmp_path):
    for path in BENCHMARKS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--render", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "RESULTS.md").read_bytes() == (BENCHMARKS / "RESULTS.md").read_bytes()
    for name in ("results.json", "sections.json"):  # rewritten unchanged
        assert (tmp_path / name).read_bytes() == (BENCHMARKS / name).read_bytes()
