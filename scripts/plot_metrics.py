"""Draw the loss curves (and, for DPO runs, reward accuracy and margin) of a run's metrics.csv to a PNG.

    python scripts/plot_metrics.py out/aligner/SmolLM2-135M-Instruct/metrics.csv --out loss.png

Needs matplotlib (`pip install matplotlib`, or the `[plot]` extra). See howto/finetune.md.
"""

from pathlib import Path
from typing import Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.files import check_output
from lit_aligner.training.plot import metrics_file, plot_metrics, read_metrics


def main(metrics: tyro.conf.Positional[Path], out: Optional[Path] = None, title: Optional[str] = None,
         force: bool = False) -> None:
    """Plot METRICS (a metrics.csv written by finetune/aligner.py or finetune/aligner_dpo.py).

    Args:
        metrics: the metrics.csv file, or the run directory that holds it.
        out: the PNG to write (default: loss.png next to the CSV).
        title: plot title (default: the run directory's name).
        force: replace an existing --out file.
    """
    metrics = metrics_file(metrics)
    read_metrics(metrics)  # a file that is no metrics.csv says so before anything about --out
    out = check_output(out or metrics.with_name("loss.png"), [metrics], force)
    print(f"wrote {plot_metrics(metrics, out, title)}")


if __name__ == "__main__":
    run_cli(main)
