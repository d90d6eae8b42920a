"""The demo's story and its time: `explaind demo` in its default configuration.

Records what the demo claims — the run groks (final test accuracy against chance 1/p, the
memorisation / plateau / generalisation phases found on the accuracy curves) and the whole
pipeline (record, kernel, report) fits in two minutes on two CPU cores — together with the
machine's load average, since a shared machine slows every phase.

    python bench/bench_demo.py            # writes bench/results/demo.json
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explaind_attr.app.demo import DemoConfig, run_demo  # noqa: E402
from explaind_attr.app.demo.run import demo_phases  # noqa: E402


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(Path(tmp) / "demo", progress=False)
        with open(summary.out_dir / "history.csv") as fh:
            rows = [(int(s), float(a), float(b)) for s, a, b in list(csv.reader(fh))[1:]]
    cfg = DemoConfig()
    out = {
        "command": "python bench/bench_demo.py",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": summary.seconds,
        "train_accuracy": summary.train_accuracy,
        "test_accuracy": summary.test_accuracy,
        "chance": 1.0 / cfg.p,
        "phases": demo_phases(rows, cfg.steps),
        "accuracy_every_60_steps": [r for r in rows if r[0] % 60 == 0],
        "completeness": summary.completeness_line,
    }
    path = ROOT / "bench" / "results" / "demo.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
