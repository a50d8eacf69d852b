"""`make demo`'s pipeline end to end, in seconds: data, training under the demo's config, the COCO
table, the AP curve, the pictures."""
from __future__ import annotations

import json

from detrkit import demo


def test_demo_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--time-limit", "1", "--num-train", "8", "--num-val", "3",
               "--set", "data.num_workers=0", "--set", "train.batch_size=4"])
    printed = capsys.readouterr().out
    assert "training deformable_detr" in printed and "Average Precision" in printed
    stats = json.loads((out / "metrics.json").read_text())
    assert set(stats) >= {"AP", "AP50", "APs", "AR100"} and all(0 <= v <= 1 or v == -1 for v in stats.values())
    curve = demo.curve(out / "run" / "metrics.jsonl")
    assert curve and curve[-1]["step"] >= 1 and curve[-1]["AP"] == stats["AP"]  # the last evaluation is the table
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["000000.png", "000001.png", "000002.png"]
