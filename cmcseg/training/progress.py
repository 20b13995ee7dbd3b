"""What a training run shows and keeps: ``log.txt``, a tqdm bar, the metrics history and ``progress.png``.

* :func:`attach_log_file` adds a ``logging.FileHandler`` on ``log.txt`` to the ``cmcseg``
  logger, so every library message of the run (network, data, trainer) lands in the file.
* :class:`MetricsHistory` is one list per metric, one value per epoch; it travels inside the
  checkpoints so that a resumed run continues the same curves.
* :func:`plot_progress` draws ``progress.png`` with matplotlib's Agg backend (no display
  needed): losses (total, supervised, each unlabeled term), their current weights, pseudo-Dice
  per class with its EMA, each head's predicted foreground mass per class (a collapsing head
  shows here first), the learning rate and the epoch time. The file is written atomically.
* :func:`iteration_bar` is the per-epoch tqdm bar (loss and it/s), silent on ranks other than 0.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from cmcseg.image_io import atomic_path, make_folder, write_fault

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_FILE = "log.txt"
PLOT_FILE = "progress.png"
#: history keys with this prefix are loss terms (plotted together)
LOSS_PREFIX = "loss/"
#: history keys with this prefix are per-class pseudo-Dice values
DICE_PREFIX = "dice/"
#: history keys with this prefix are loss weights (ramp-ups)
WEIGHT_PREFIX = "weight/"
#: history keys with this prefix are a head's mean predicted probability of a class (``mass/<head>/<class>``)
MASS_PREFIX = "mass/"
#: training diagnostics that are neither a loss nor a weight (e.g. the share of pseudo-labelled voxels)
#: step outputs that are not losses: drawn in the weights panel, never in the loss panel
DIAGNOSTIC_KEYS = ("pseudo_label_kept", "modalities_per_row")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_log_file(output_folder: Path, logger_name: str = "cmcseg") -> logging.FileHandler:
    """Append the ``logger_name`` hierarchy's INFO+ messages to ``<output>/log.txt``; returns the handler.

    The logger's level is lowered to INFO if it was higher, so the file gets INFO messages even
    when the application configured no logging.
    """
    make_folder(output_folder)
    try:
        handler = logging.FileHandler(output_folder / LOG_FILE, mode="a", encoding="utf-8")
    except OSError as e:
        raise (write_fault(output_folder, e, output_folder / LOG_FILE) or e) from e
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger(logger_name)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler | None, logger_name: str = "cmcseg") -> None:
    """Remove and close a handler from :func:`attach_log_file`."""
    if handler is None:
        return
    logging.getLogger(logger_name).removeHandler(handler)
    handler.close()


@dataclass
class MetricsHistory:
    """Per-epoch metrics: ``values[key][i]`` belongs to ``epochs[i]`` (NaN where a metric was absent)."""

    epochs: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def append(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Record one epoch's metrics; new keys are back-filled with NaN, missing keys get NaN."""
        self.epochs.append(int(epoch))
        n = len(self.epochs)
        for key, value in metrics.items():
            self.values.setdefault(key, [math.nan] * (n - 1)).append(float(value))
        for series in self.values.values():
            if len(series) < n:
                series.append(math.nan)

    def last(self, key: str, default: float = math.nan) -> float:
        """The latest value of ``key``."""
        series = self.values.get(key)
        return series[-1] if series else default

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Metric names starting with ``prefix``, in insertion order."""
        return [k for k in self.values if k.startswith(prefix)]

    def state_dict(self) -> dict:
        """Plain lists, for a checkpoint."""
        return {"epochs": list(self.epochs), "values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`."""
        self.epochs = [int(e) for e in state.get("epochs", [])]
        self.values = {k: [float(x) for x in v] for k, v in state.get("values", {}).items()}


def epoch_means(outputs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over the train-step outputs of one epoch that have it: a diagnostic of the unlabeled
    objective exists only on the steps that run it (``unlabeled_every``), loss terms and weights on every step."""
    keys = list(dict.fromkeys(k for o in outputs for k in o))
    means = {}
    for k in keys:
        values = [o[k] for o in outputs if k in o]
        means[k] = float(sum(values) / len(values))
    return means


def loss_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """Train-step means as history keys: ``loss`` -> ``loss/total``, ``weight/*`` as they are, others ``loss/*``."""
    out: dict[str, float] = {}
    for key, value in means.items():
        if key == "loss":
            out[f"{LOSS_PREFIX}total"] = value
        elif key.startswith((WEIGHT_PREFIX, MASS_PREFIX)) or key in DIAGNOSTIC_KEYS:
            out[key] = value
        else:
            out[f"{LOSS_PREFIX}{key}"] = value
    return out


def iteration_bar(iterable: Iterable, total: int, description: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over one epoch's iterations (shows it/s; the trainer sets the loss as postfix)."""
    return tqdm(iterable, total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True,
                unit="it")


def _plot_series(ax, epochs: Sequence[int], history: MetricsHistory, keys: Iterable[str], strip: str = "",
                 **style) -> None:
    style.setdefault("marker", "o")  # a single epoch is a point, which a line alone does not show
    style.setdefault("markersize", 3)
    for key in keys:
        ax.plot(epochs, history.values[key], label=key[len(strip):] if strip else key, **style)


def plot_progress(history: MetricsHistory, path: Path, title: str = "") -> None:
    """Draw the progress panels into ``path`` (PNG, atomic)."""
    fig = progress_figure(history, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def progress_figure(history: MetricsHistory, title: str = "") -> Figure:
    """The six panels (losses; weights and diagnostics; pseudo-Dice; foreground mass; learning rate; epoch time),
    top to bottom; every series carries markers, so one epoch already shows."""
    # the Agg canvas directly, no pyplot: no display needed and no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = history.epochs
    fig = Figure(figsize=(12, 22))
    FigureCanvasAgg(fig)
    ax_loss, ax_weight, ax_dice, ax_mass, ax_lr, ax_time = fig.subplots(6, 1)
    total = f"{LOSS_PREFIX}total"
    if total in history.values:  # a wide pale band under the terms: visible even where one term equals it
        _plot_series(ax_loss, epochs, history, [total], strip=LOSS_PREFIX, linewidth=6, alpha=0.35, color="black")
    _plot_series(ax_loss, epochs, history, [k for k in history.keys_with_prefix(LOSS_PREFIX) if k != total],
                 strip=LOSS_PREFIX)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title or "training progress")
    _plot_series(ax_weight, epochs, history, history.keys_with_prefix(WEIGHT_PREFIX), strip=WEIGHT_PREFIX)
    _plot_series(ax_weight, epochs, history, [k for k in DIAGNOSTIC_KEYS if k in history.values], linestyle=":")
    ax_weight.set_ylabel("loss weight / share /\nmodalities per row")
    _plot_series(ax_mass, epochs, history, history.keys_with_prefix(MASS_PREFIX), strip=MASS_PREFIX, linewidth=1)
    ax_mass.set_ylabel("predicted foreground mass\n(head/class, unlabeled rows)")
    dice_keys = history.keys_with_prefix(DICE_PREFIX)
    _plot_series(ax_dice, epochs, history, dice_keys, strip=DICE_PREFIX, linestyle="--", linewidth=1)
    for key in ("pseudo_dice", "pseudo_dice_ema"):
        if key in history.values:
            _plot_series(ax_dice, epochs, history, [key], linewidth=2)
    ax_dice.set_ylabel("pseudo-Dice (validation patches)")
    ax_dice.set_ylim(0, 1)
    if "lr" in history.values:
        _plot_series(ax_lr, epochs, history, ["lr"])
    ax_lr.set_ylabel("learning rate")
    if "epoch_time" in history.values:
        _plot_series(ax_time, epochs, history, ["epoch_time"])
    ax_time.set_ylabel("epoch time (s)")
    ax_time.set_xlabel("epoch")
    for ax in (ax_loss, ax_weight, ax_dice, ax_mass, ax_lr, ax_time):
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def format_metrics(metrics: Mapping[str, float], keys: Iterator[str] | Sequence[str] | None = None) -> str:
    """``key value`` pairs for a log line (4 significant digits)."""
    chosen = list(keys) if keys is not None else list(metrics)
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in chosen if k in metrics)
