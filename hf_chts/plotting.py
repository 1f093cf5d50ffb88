"""PNG figures of sparse training: density / active neurons over training, degree distributions, a mask.

matplotlib is imported only inside these functions, and only its object-oriented API with the Agg canvas
(no ``pyplot``), so plotting never changes the backend of the calling program and works without a display.

Training curves come from a Trainer's ``trainer_state.json`` ``log_history``: every key starting with the
prefix (default ``"sparsity/"``) is plotted, grouped by its last component, so ``sparsity/density`` (the
model-wide value, drawn thick) and ``sparsity/<layer>/density`` (per layer, thin) share ``density.png``.

Example:
    >>> from hf_chts.plotting import plot_training_curves
    >>> plot_training_curves("out/trainer_state.json", "out/plots")  # doctest: +SKIP
    [PosixPath('out/plots/active_neurons.png'), PosixPath('out/plots/density.png')]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerState

from .stats import layer_sort_key

# logged keys that are not curves worth a figure (``update_step`` is the step itself: y = x)
NOT_PLOTTED = ("update_step",)
_INSTALL_HINT = "Plotting needs matplotlib: pip install 'hf_chts[plot]' (or pip install matplotlib)."

__all__ = [
    "load_log_history",
    "metric_series",
    "plot_loss",
    "plot_training_curves",
    "plot_degree_distribution",
    "plot_mask",
    "plot_checkpoint",
]


def _figure(width: float = 7.0, height: float = 4.0):
    """A matplotlib ``Figure`` on an Agg canvas, without touching pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def load_log_history(
    source: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> list[dict]:
    """The ``log_history`` list from a ``trainer_state.json`` path, a folder holding one, or the loaded dict.

    Raises:
        FileNotFoundError: no ``trainer_state.json`` where one was expected.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            candidates = [path / "trainer_state.json"] + sorted(
                path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
            )[::-1]
            path = next((p for p in candidates if p.is_file()), path / "trainer_state.json")
        if not path.is_file():
            raise FileNotFoundError(f"No trainer_state.json at {path}; pass the file written by the Trainer.")
        return list(TrainerState.load_from_json(str(path)).log_history)
    if isinstance(source, Mapping):
        return list(source.get("log_history", []))
    return list(source)


def metric_series(
    history: Sequence[Mapping[str, Any]], prefix: str = "sparsity/"
) -> dict[str, tuple[list, list]]:
    """``{key: (steps, values)}`` of every numeric key starting with ``prefix`` in a log history."""
    series: dict[str, tuple[list, list]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step if step is not None else len(steps))
                values.append(float(value))
    return series


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def plot_training_curves(
    source: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    prefix: str = "sparsity/",
    max_layers: int = 16,
) -> list[Path]:
    """One PNG per metric found under ``prefix`` (``density.png``, ``active_neurons.png``, ...).

    Args:
        source: ``trainer_state.json`` path, a folder holding it, or the loaded dict / log history.
        output_dir: folder for the PNGs (created).
        prefix (`str`, defaults to ``"sparsity/"``): keys plotted; ``<prefix><metric>`` is the model-wide
            line, ``<prefix><layer>/<metric>`` a per-layer line.
        max_layers (`int`, defaults to 16): per-layer lines drawn per figure (evenly spaced over the layers).

    Returns:
        `list[Path]`: the written files, sorted.

    Raises:
        ValueError: no key starts with ``prefix`` (the message lists the keys that exist).
    """
    history = load_log_history(source)
    series = metric_series(history, prefix)
    if not series:
        keys = sorted({k for e in history for k in e})
        raise ValueError(
            f"No logged key starts with {prefix!r}; keys present: {', '.join(keys[:30]) or '(none)'}. "
            "Pass --prefix to plot other keys."
        )
    groups: dict[str, dict[str, tuple[list, list]]] = {}
    for key, data in series.items():
        rest = key[len(prefix) :]
        layer, _, metric = rest.rpartition("/")
        if metric not in NOT_PLOTTED:
            groups.setdefault(metric, {})[layer] = data
    paths = []
    for metric, lines in sorted(groups.items()):
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        layers = sorted((name for name in lines if name), key=layer_sort_key)
        if len(layers) > max_layers:
            idx = torch.linspace(0, len(layers) - 1, max_layers).round().long().tolist()
            layers = [layers[i] for i in dict.fromkeys(idx)]
        for layer in layers:
            steps, values = lines[layer]
            ax.plot(steps, values, linewidth=0.9, alpha=0.7, label=layer)
        if "" in lines:
            steps, values = lines[""]
            ax.plot(steps, values, color="black", linewidth=2.2, label="model")
        _plain_y_axis(ax, [v for _, values in lines.values() for v in values])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(f"{prefix}{metric}")
        ax.grid(alpha=0.3)
        if len(layers) + ("" in lines) <= 20:
            ax.legend(fontsize=6, loc="best")
        paths.append(_save(fig, Path(output_dir) / f"{_safe_name(metric)}.png"))
    return paths


def _plain_y_axis(ax, values: Sequence[float]) -> None:
    """Absolute tick labels (no ``+0.3`` offset), and a constant series drawn flat in a visible range."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    if values:
        low, high = min(values), max(values)
        if high - low <= 1e-9 * max(1.0, abs(high)):
            pad = 0.05 * abs(high) or 0.05
            ax.set_ylim(low - pad, high + pad)


def plot_loss(
    source: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]], output_dir: str | os.PathLike
) -> Path | None:
    """``loss.png``: the training ``loss`` and the ``eval_loss`` of a log history; None without either."""
    history = load_log_history(source)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for key, label in (("loss", "training loss"), ("eval_loss", "validation loss")):
        steps = [e["step"] for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
        values = [float(e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
        if values:
            ax.plot(steps, values, marker="o" if len(values) < 20 else None, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, Path(output_dir) / "loss.png")


def _view(mask: torch.Tensor, transposed: bool) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"Expected a 2-D mask tensor, got {getattr(mask, 'shape', type(mask))}.")
    return (mask.T if transposed else mask).to(torch.bool).cpu()


def plot_degree_distribution(
    mask: torch.Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    transposed: bool = False,
) -> Path:
    """Histograms of a layer's in-degrees (links into each output neuron) and out-degrees (per input neuron).

    Args:
        mask: 2-D bool mask as stored (``(n_out, n_in)``, or ``(n_in, n_out)`` with ``transposed=True``).
        path: PNG file to write.
        title: figure title (default: shape and density).
    """
    view = _view(mask, transposed)
    n_out, n_in = view.shape
    fig = _figure(9.0, 3.6)
    for i, (degrees, label, limit) in enumerate(
        (
            (view.sum(1), "in-degree of output neurons", n_in),
            (view.sum(0), "out-degree of input neurons", n_out),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        values = degrees.numpy()
        bins = min(50, max(1, int(values.max()) - int(values.min()) + 1))
        ax.hist(values, bins=bins, color="tab:blue" if i == 0 else "tab:orange")
        ax.set_xlabel(f"{label} (max {limit})")
        ax.set_ylabel("neurons")
        ax.grid(alpha=0.3)
    density = float(view.float().mean())
    fig.suptitle(title or f"{n_out} x {n_in} layer, density {density:.3f}")
    return _save(fig, path)


def plot_mask(
    mask: torch.Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    max_size: int = 512,
    transposed: bool = False,
) -> Path:
    """A picture of one layer's mask (rows = output neurons, columns = input neurons).

    A mask larger than ``max_size`` on a side is shown as the link density of blocks (grey levels).
    """
    view = _view(mask, transposed).float()
    n_out, n_in = view.shape
    shown = view
    if n_out > max_size or n_in > max_size:
        size = (min(n_out, max_size), min(n_in, max_size))
        shown = torch.nn.functional.adaptive_avg_pool2d(view[None, None], size)[0, 0]
    fig = _figure(6.0, max(2.5, 6.0 * n_out / max(n_in, 1)) if n_out < n_in else 6.0)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel(f"input neuron ({n_in})")
    ax.set_ylabel(f"output neuron ({n_out})")
    if shown.shape != view.shape:  # grey levels only mean something for block densities
        fig.colorbar(image, ax=ax, label="link density of the block")
    ax.set_title(title or f"mask {n_out} x {n_in}, density {float(view.mean()):.3f}")
    return _save(fig, path)


def plot_checkpoint(
    folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layer: str | None = None,
) -> list[Path]:
    """Degree distributions and the mask picture of one layer of a checkpoint folder (either format).

    Args:
        folder: checkpoint folder.
        output_dir: folder for the PNGs.
        layer: module name (``model.layers.0.mlp.up_proj``); default the first sparse layer.
    """
    from .compact import is_transposed_config, read_config, read_masks

    masks = read_masks(folder)
    if not masks:
        raise ValueError(f"{folder} holds no sparse masks; nothing to plot.")
    if layer is None:
        layer = next(iter(masks))
    if layer not in masks:
        raise ValueError(f"No sparse layer {layer!r} in {folder}; sparse layers: {', '.join(masks)}.")
    transposed = is_transposed_config(read_config(folder))
    out = Path(output_dir)
    stem = _safe_name(layer)
    return [
        plot_degree_distribution(
            masks[layer], out / f"degrees_{stem}.png", title=layer, transposed=transposed
        ),
        plot_mask(masks[layer], out / f"mask_{stem}.png", title=layer, transposed=transposed),
    ]
