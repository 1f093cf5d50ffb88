"""``hf-chts``: command line for sparse checkpoints.

Subcommands::

    hf-chts eval    CHECKPOINT [--tasks arc_easy,piqa] [--local_data_dir DIR] [--limit N] [--output_dir DIR]
    hf-chts inspect CHECKPOINT [--json FILE]
    hf-chts plot    RUN_OR_STATE [--output_dir DIR] [--prefix sparsity/] [--checkpoint DIR] [--layer NAME]
    hf-chts export  CHECKPOINT OUTPUT --format compact|dense [--push_to_hub --hub_model_id USER/NAME]
    hf-chts card    CHECKPOINT [--dataset NAME] [--validation_perplexity X] [--push_to_hub --hub_model_id ID]

A CHECKPOINT is a folder written by ``save_pretrained`` (masks as ``*.weight_mask`` tensors) or by
``hf-chts export --format compact``; every subcommand accepts both.

Examples:
    hf-chts eval out/llama-60m --local_data_dir /data/lm_eval --limit 200
    hf-chts inspect out/llama-60m
    hf-chts plot out/llama-60m --output_dir out/plots --layer model.layers.0.mlp.up_proj
    hf-chts export out/llama-60m out/llama-60m-compact --format compact
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .version import __version__

# files copied next to an exported checkpoint when the source folder has them
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "README.md",
    "trainer_state.json",
    "zero_shot_results.json",
    "zero_shot_results.md",
)


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub afterwards.")
    parser.add_argument(
        "--hub_model_id", default=None, help="Hub repository id, e.g. your-name/llama-60m-chtss."
    )
    parser.add_argument("--hub_private", action="store_true", help="Create the Hub repository private.")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the stored login).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-chts",
        description="Evaluate, inspect, plot and export sparse checkpoints trained with hf_chts.",
    )
    parser.add_argument("--version", action="version", version=f"hf-chts {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,inspect,plot,export,card}")

    p = sub.add_parser("eval", help="Zero-shot evaluation with lm-eval (offline with --local_data_dir).")
    p.add_argument("checkpoint", help="Checkpoint folder (save_pretrained or compact format).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the checkpoint folder).")
    p.add_argument(
        "--tasks",
        default=None,
        help="Comma-separated task names. Default: the paper's tasks, or every local task found under "
        "--local_data_dir. Offline test task: hf_chts_tiny_mc.",
    )
    p.add_argument(
        "--local_data_dir", default=None, help="Folder with local data files (llm-foundry ICL jsonl)."
    )
    p.add_argument(
        "--include_path", action="append", default=None, help="Folder of extra lm-eval YAML tasks."
    )
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--limit", type=float, default=None, help="Items per task (int) or fraction (< 1).")
    p.add_argument("--batch_size", default="8", help="Batch size or 'auto'.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu).")
    p.add_argument("--output_dir", default=None, help="Where results go (default: the checkpoint folder).")
    p.add_argument(
        "--no_lm_eval_tasks",
        action="store_true",
        help="Only shipped / --include_path tasks (skips indexing lm-eval's task list).",
    )

    p = sub.add_parser(
        "inspect",
        help="Per-layer density (from the masks and from the weights), degrees and active neurons of a "
        "checkpoint; exit status 1 when masks or weights disagree.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--json", default=None, help="Also write the figures to this JSON file.")

    p = sub.add_parser("plot", help="PNG plots: training curves, degree distributions, a layer's mask.")
    p.add_argument("source", help="trainer_state.json, a training output folder, or a checkpoint folder.")
    p.add_argument("--output_dir", default=None, help="Folder for the PNGs (default: <source folder>/plots).")
    p.add_argument("--prefix", default="sparsity/", help="Log keys to plot (default: sparsity/).")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="Checkpoint of the mask plots (default: source, or its newest checkpoint-* with masks).",
    )
    p.add_argument("--layer", default=None, help="Layer for the mask plots (default: the first sparse one).")

    p = sub.add_parser("export", help="Write a checkpoint as compact (values + bitmask) or plain dense.")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--format", choices=("compact", "dense"), required=True)
    _add_hub_args(p)

    p = sub.add_parser("card", help="Write the model card README.md of a checkpoint (and optionally push).")
    p.add_argument("checkpoint")
    p.add_argument("--model_name", default=None)
    p.add_argument("--dataset", action="append", default=None, help="Training dataset (repeatable).")
    p.add_argument("--training_steps", type=int, default=None)
    p.add_argument("--training_tokens", type=int, default=None)
    p.add_argument("--validation_perplexity", type=float, default=None)
    p.add_argument("--eval_results", default=None, help="zero_shot_results.json (default: the folder's).")
    p.add_argument("--license", default="apache-2.0")
    _add_hub_args(p)
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, results_to_markdown

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    results = evaluate(
        args.checkpoint,
        args.tokenizer,
        args.tasks,
        local_data_dir=args.local_data_dir,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=args.device,
        output_dir=args.output_dir or args.checkpoint,
        include_lm_eval_tasks=not args.no_lm_eval_tasks,
    )
    print(results_to_markdown(results))
    print(
        f"Results written to {Path(args.output_dir or args.checkpoint) / 'zero_shot_results.json'} (and .md)"
    )
    return 0


def _inspect(folder: str) -> dict:
    from .compact import is_compact, is_transposed_config, read_config, read_masks
    from .stats import mask_statistics, mlp_active_neurons, summarize_by_layer_type

    masks = read_masks(folder)
    stats = mask_statistics(masks, transposed=is_transposed_config(read_config(folder)))
    problems = _weight_checks(Path(folder), masks, stats) if masks else []
    return {
        "checkpoint": str(folder),
        "format": "compact" if is_compact(folder) else "safetensors",
        "layers": stats,
        "by_type": summarize_by_layer_type(stats),
        "mlp_active_neurons": mlp_active_neurons(masks),
        "problems": problems,
    }


def _weight_checks(folder: Path, masks: dict, stats: dict) -> list[str]:
    """Each layer's density counted from its weights (``weight_density``) and its non-zero weights where the
    mask removes the link (``nonzero_masked``), into ``stats``; what is wrong with the masks or weights."""
    from safetensors import safe_open

    from .compact import COMPACT_FILE, is_compact
    from .weights_io import MASK_SUFFIX, mask_specs, read_tensor, tensor_files, weight_files

    problems, leaks = [], []
    if is_compact(folder):
        path = folder / COMPACT_FILE
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for name, mask in masks.items():
                if name + ".weight.values" not in keys:
                    problems.append(f"{path} lacks {name}.weight.values; export the checkpoint again.")
                    continue
                values, links = handle.get_tensor(name + ".weight.values"), int(mask.sum())
                stats[name].update(weight_density=int((values != 0).sum()) / mask.numel(), nonzero_masked=0)
                if values.dim() != 1 or values.numel() != links:
                    problems.append(
                        f"{path}: {name}.weight.values holds {values.numel()} values (shape "
                        f"{tuple(values.shape)}) for the {links} links its bitmask sets; the file is "
                        "corrupt. Export the checkpoint again (hf-chts export) from the trained model."
                    )
        return problems
    files = weight_files(folder)
    for key, (dtype, _) in (mask_specs(None, files) or {}).items():
        if dtype != "torch.bool":
            problems.append(
                f"{folder}: mask {key} is stored as {dtype}, not torch.bool; the file was not written by a "
                "sparse model's save_pretrained. Save the model again, or use another checkpoint."
            )
    location = tensor_files(files, suffix=".weight")
    for name, mask in masks.items():
        file = location.get(name + ".weight")
        weight = read_tensor(file, name + ".weight") if file is not None else None
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            problems.append(
                f"{file or folder}: {name}{MASK_SUFFIX} has shape {tuple(mask.shape)} but its weight "
                f"{None if weight is None else tuple(weight.shape)}; save the model again."
            )
            continue
        nonzero = weight != 0
        leaked = int((nonzero & ~mask).sum())
        stats[name].update(weight_density=int(nonzero.sum()) / mask.numel(), nonzero_masked=leaked)
        if leaked:
            leaks.append((name, leaked, file))
    if leaks:
        name, leaked, file = leaks[0]
        problems.append(
            f"{file}: {leaked} weights of {name} are non-zero where its weight_mask removes the link "
            f"({len(leaks)} layers in all; the model computes with a denser matrix than its masks say, e.g. "
            "after PEFT's own merge_and_unload). Merge adapters with hf_chts.merge_and_unload, or zero those "
            f"weights with hf_chts.compact.zero_masked_weights({str(folder)!r})."
        )
    return problems


def _cmd_inspect(args: argparse.Namespace) -> int:
    report = _inspect(args.checkpoint)
    layers = report["layers"]
    print(f"{report['checkpoint']} ({report['format']} format): {len(layers)} sparse layers")
    if not layers:
        print("No weight_mask found: a dense checkpoint.")
    else:
        width = max(len(n) for n in layers)
        head = (
            f"{'layer':<{width}}  {'shape':>11}  {'density':>7}  {'w.dens':>7}  {'nnz':>9}  "
            f"{'in-degree min/mean/max':>23}  {'out-degree min/mean/max':>23}  {'act.out':>7}  {'act.in':>7}"
        )
        print(head)
        print("-" * len(head))
        for name, s in layers.items():
            ind, outd = s["in_degree"], s["out_degree"]
            shape = f"{s['shape'][0]}x{s['shape'][1]}"
            print(
                f"{name:<{width}}  {shape:>11}  {s['density']:>7.4f}  {s.get('weight_density', -1):>7.4f}  "
                f"{s['nnz']:>9}  "
                f"{ind['min']:>6.0f}/{ind['mean']:>7.1f}/{ind['max']:>6.0f}    "
                f"{outd['min']:>6.0f}/{outd['mean']:>7.1f}/{outd['max']:>6.0f}    "
                f"{s['active_out']:>7.3f}  {s['active_in']:>7.3f}"
            )
        print()
        print(f"{'layer type':<12}  {'layers':>6}  {'density':>7}  {'act.out':>7}  {'act.in':>7}")
        for name, s in report["by_type"].items():
            print(
                f"{name:<12}  {s['layers']:>6}  {s['density']:>7.4f}  {s['active_out']:>7.3f}  "
                f"{s['active_in']:>7.3f}"
            )
        print(
            "Active neurons (mean over layers of (act.out + act.in) / 2): "
            f"{report['by_type']['all']['active_neurons']:.4f}"
        )
        if report["mlp_active_neurons"] is not None:
            print(f"MLP hidden neurons active (gate, up and down): {report['mlp_active_neurons']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if report["problems"]:  # after the table: the figures show what is wrong; the exit status says it
        raise ValueError(" ".join(report["problems"][:2]) + f" ({len(report['problems'])} problems in all)")
    return 0


def _has_masks(folder: Path) -> bool:
    from .compact import read_masks

    try:
        return bool(read_masks(folder))
    except FileNotFoundError:
        return False


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import load_log_history, plot_checkpoint, plot_loss, plot_training_curves

    source = Path(args.source)
    folder = source if source.is_dir() else source.parent
    output_dir = Path(args.output_dir) if args.output_dir else folder / "plots"
    written = []
    state_found = True
    try:
        load_log_history(source)
    except FileNotFoundError:
        state_found = False
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{source} is not a trainer_state.json ({type(err).__name__}: {err}). Pass the "
            "trainer_state.json the Trainer wrote, a training output folder, or --checkpoint FOLDER."
        ) from err
    if state_found:
        written += [p for p in [plot_loss(source, output_dir)] if p is not None]
        written += plot_training_curves(source, output_dir, prefix=args.prefix)
    checkpoint = Path(args.checkpoint) if args.checkpoint else _checkpoint_with_masks(folder)
    if checkpoint is not None and (args.checkpoint or args.layer or _has_masks(checkpoint)):
        written += plot_checkpoint(checkpoint, output_dir, layer=args.layer)
    elif written:
        print(f"No masks in {folder} or its checkpoint-* folders: pass --checkpoint DIR for the mask plots.")
    if not written:
        raise ValueError(
            f"Nothing to plot from {source}: no trainer_state.json and no checkpoint with masks. Pass a "
            "trainer_state.json, a training output folder or --checkpoint."
        )
    for path in written:
        print(path)
    return 0


def _checkpoint_with_masks(folder: Path) -> Path | None:
    """``folder`` if it holds masks, else its newest ``checkpoint-*`` that does, else None."""
    steps = sorted(
        folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name[11:].isdigit() else -1
    )
    return next((p for p in [folder, *steps[::-1]] if p.is_dir() and _has_masks(p)), None)


def _copy_side_files(source: Path, output: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file() and not (output / name).exists():
            shutil.copy(source / name, output / name)


def _push(args: argparse.Namespace, folder: Path, card_source: Path) -> None:
    from .hub import push_to_hub, render_model_card

    if not (folder / "README.md").is_file():
        render_model_card(card_source, repo_id=args.hub_model_id).save(folder / "README.md")
    info = push_to_hub(
        folder, args.hub_model_id, token=args.hub_token, private=args.hub_private, write_card=False
    )
    print(f"Pushed {folder} to {getattr(info, 'commit_url', None) or args.hub_model_id}")


def _cmd_export(args: argparse.Namespace) -> int:
    from .compact import folder_size, load_sparse_model, save_compact, save_dense

    source, output = Path(args.checkpoint), Path(args.output)
    if output.resolve() == source.resolve():
        raise ValueError("The export OUTPUT folder must differ from the CHECKPOINT folder.")
    model = load_sparse_model(source)
    if args.format == "compact":
        save_compact(model, output)
    else:
        save_dense(model, output)
    _copy_side_files(source, output)
    print(
        f"Wrote {args.format} checkpoint {output}: {folder_size(output) / 1e6:.2f} MB of weights "
        f"(source {folder_size(source) / 1e6:.2f} MB)"
    )
    if args.push_to_hub:
        _push(args, output, source)
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .hub import write_model_card

    path = write_model_card(
        args.checkpoint,
        model_name=args.model_name,
        repo_id=args.hub_model_id,
        datasets=args.dataset,
        training_steps=args.training_steps,
        training_tokens=args.training_tokens,
        validation_perplexity=args.validation_perplexity,
        eval_results=args.eval_results,
        license=args.license,
    )
    print(f"Wrote {path}")
    if args.push_to_hub:
        _push(args, Path(args.checkpoint), Path(args.checkpoint))
    return 0


COMMANDS = {
    "eval": _cmd_eval,
    "inspect": _cmd_inspect,
    "plot": _cmd_plot,
    "export": _cmd_export,
    "card": _cmd_card,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-chts`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "push_to_hub", False) and not args.hub_model_id:
        parser.error(
            "--push_to_hub needs --hub_model_id, the Hub repository id (e.g. your-name/llama-60m-chtss)."
        )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as err:
        print(f"hf-chts {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line, never a traceback; HF_CHTS_DEBUG=1 shows it
        if os.environ.get("HF_CHTS_DEBUG"):
            raise
        print(
            f"hf-chts {args.command}: error: {type(err).__name__}: {_one_line(err)} (set HF_CHTS_DEBUG=1 "
            "for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
