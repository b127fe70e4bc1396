"""`python -m fx_sparsity bench --quick`: every case runs and reports ratios (no timing asserted)."""
import json
import math

from fx_sparsity.__main__ import main


def test_quick_bench_all_cases(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} == {"mask_update", "prepare", "memory", "train_step", "inference"}
    mask_rows = [r for r in rows if r["case"] == "mask_update"]
    assert len(mask_rows) == 3 and all(r["masks_identical"] for r in mask_rows)
    for row in rows:
        ratios = row.get("ratios") or {}
        assert ratios, row["name"]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ratios.values()), row
    memory = {r["name"]: r["ratios"] for r in rows if r["case"] == "memory"}
    assert memory["masks, dtype=float32"]["mask / weight bytes"] == 1.0
    assert memory["masks, dtype=bool"]["mask / weight bytes"] == 0.25
    printed = capsys.readouterr().out
    assert "## mask_update" in printed and "## inference" in printed
