"""The embedded demo runs end to end (quick settings) and writes its figure and table."""

import json

from rdt_lib.demo import main


def test_quick_demo_writes_figure_and_table(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods[:2] == ["base", "tuned"]
    assert {"switch@0.5", "power:2", "LoRA scale 0.5"} <= set(methods)
    for r in data["results"]:
        assert f"| {r['method']} |" in table
        assert 0 <= r["off_distribution"] <= 1 and 0 <= r["mode_entropy"] <= 1 and 0 <= r["modes_covered"] <= 8
    assert str(tmp_path / "tradeoff.png") in out or "tradeoff.png" in out
