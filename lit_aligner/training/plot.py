"""Reading a run's metrics.csv and drawing its curves (scripts/plot_metrics.py)."""

import csv
from pathlib import Path
from typing import Dict, List, Optional, Union

from lit_aligner.files import atomic_write
from lit_aligner.training.config import TrainError

PathLike = Union[str, Path]


def metrics_file(path: PathLike) -> Path:
    """A run's metrics.csv: `path` itself, or the one inside `path` when it is the run directory."""
    path = Path(path)
    if path.is_dir() and (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    if not path.is_file():
        raise TrainError(f"{path}: no such metrics file; runs write OUT/metrics.csv (give that path or OUT).")
    return path


def read_metrics(path: PathLike) -> List[Dict[str, str]]:
    """The rows of a run's metrics.csv (or of OUT/metrics.csv, given the run directory OUT), as strings."""
    path = metrics_file(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise TrainError(f"{path} is not a metrics.csv of a training run ({e}).") from None
    if not rows or "step" not in rows[0]:
        raise TrainError(f"{path} is not a metrics.csv of a training run (no `step` column or no rows).")
    return rows


def plot_metrics(path: PathLike, out: PathLike, title: Optional[str] = None) -> Path:
    """Draw every loss-like column of a metrics.csv (train/val loss; DPO: also reward accuracy and margin) and the
    gradient norm against the step to the PNG `out`. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("plotting needs matplotlib: pip install matplotlib") from None
    path = metrics_file(path)
    rows = read_metrics(path)
    panels = [("loss (nats)", ("train_loss", "val_loss"))]
    if any(r.get("val_reward_accuracy") or r.get("train_reward_accuracy") for r in rows):
        panels.append(("reward", ("val_reward_accuracy", "train_reward_accuracy", "val_reward_margin")))
    if any(r.get("grad_norm") for r in rows):  # runs before the column have none
        panels.append(("gradient norm (before clipping)", ("grad_norm",)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, cols) in zip(axes[0], panels):
        for col in cols:
            pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="o" if col.startswith("val") else None,
                        markersize=3, label=col)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or Path(path).resolve().parent.name)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return Path(out)
