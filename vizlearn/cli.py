"""Command line: ``vizlearn report | layers | predict | sanity | finetune | experiments``.

Bad input (unknown layer, missing or empty folder, ``--k 0``, offline weights, ...) exits with
code 2 and one line on stderr saying what to do; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"vizlearn: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _weights(text: str | None):
    if text is None or text.lower() == "none":
        return None
    return text


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0",
                   help="efficientnet_lite0 (bundled ImageNet weights, default), a torchvision or timm name")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (pretrained; downloads for torchvision/timm names), none (random), or a state-dict path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vizlearn", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("report", help="Fig.-2 panels, layer-1 filters, activation maps, predictions -> --out")
    _add_model(p)
    p.add_argument("--images", help="folder of photos (recursive); default: built-in sample photos")
    p.add_argument("--layers", type=_csv, help="comma-separated layer names; default: ~5 from shallow to deep")
    p.add_argument("--k", type=_positive_int, default=9, help="top-k activations per filter (default 9)")
    p.add_argument("--filters", type=_positive_int, default=8, help="filters per layer (default 8)")
    p.add_argument("--crops", type=_positive_int, default=8, help="images per photo: whole + random crops (default 8)")
    p.add_argument("--experiments", type=_csv, default=["occlusion", "sanity", "layer1"],
                   help="comma-separated extra experiments from occlusion, sanity, layer1, correspondence, "
                        "evolution, invariance (default: occlusion,sanity,layer1); 'none' for none")
    p.add_argument("--methods", type=_csv, default=["deconvnet", "guided"],
                   help="projection methods shown side by side: deconvnet, guided, gradient (default deconvnet,guided)")
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("layers", help="list every layer with kind, output shape and receptive field")
    p.add_argument("model", nargs="?", default="efficientnet_lite0")
    p.add_argument("--weights", default=None,
                   help="default none (random init: shapes and receptive fields do not depend on weights)")
    p.add_argument("--input-size", type=_positive_int, default=None, help="input side in pixels (default: model's)")

    p = sub.add_parser("predict", help="top-5 classes with probabilities for image files")
    p.add_argument("images", nargs="+", help="image files, or one folder of images")
    _add_model(p)
    p.add_argument("--top", type=_positive_int, default=5)

    p = sub.add_parser("sanity", help="cascading-randomisation sanity check of the projections (Adebayo et al.)")
    _add_model(p)
    p.add_argument("--layer", default=None, help="layer to project from (default: the report's middle layer)")
    p.add_argument("--method", default="deconvnet", choices=["deconvnet", "guided", "gradient"])
    p.add_argument("--out", default="figures")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("finetune", help="fine-tune on a target data set and show how much each layer moves")
    _add_model(p)
    p.add_argument("--dataset", default="digits", help="digits, lfw, or a folder with one sub-folder per class")
    p.add_argument("--out", default="figures/finetune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer epochs and recipes (a smoke run)")

    p = sub.add_parser("experiments", help="occlusion, invariance, correspondence, layer1, evolution -> --out")
    _add_model(p)
    p.add_argument("names", type=_csv, nargs="?", default=["occlusion"], help="comma-separated experiment names")
    p.add_argument("--images", help="folder of photos; default: built-in sample photos")
    p.add_argument("--out", default="figures", help="figures go to OUT/experiments/ (default figures/)")
    return parser


def _cmd_report(a) -> None:
    from .report import run_report

    run_report(model=a.model, weights=_weights(a.weights), images=a.images, layers=a.layers, k=a.k,
               filters=a.filters, crops=a.crops, out=a.out, device=a.device, seed=a.seed, methods=a.methods,
               experiments=[] if a.experiments == ["none"] else a.experiments)


def _cmd_layers(a) -> None:
    from .layers import list_layers
    from .models import load_model

    loaded = load_model(a.model, weights=_weights(a.weights))
    size = a.input_size or loaded.input_size
    print(f"{loaded.name}: input 3x{size}x{size}; receptive field = size (stride) in input pixels")
    print(f"{'layer':<36} {'kind':<22} {'output shape':<18} receptive field")
    for row in list_layers(loaded, input_size=size):
        rf = f"{row.rf_size[0]}x{row.rf_size[1]} ({row.rf_jump[0]})" if row.rf_size else "-"
        shape = "x".join(str(s) for s in row.out_shape) or "-"
        print(f"{row.name:<36} {row.kind:<22} {shape:<18} {rf}")


def _cmd_predict(a) -> None:
    from .images import load_images
    from .models import load_model, predict

    from pathlib import Path

    from .images import load_folder

    loaded = load_model(a.model, weights=_weights(a.weights), device=a.device)
    if len(a.images) == 1 and Path(a.images[0]).is_dir():  # a folder: every image in it
        photos, skipped = load_folder(a.images[0])
    else:
        photos, skipped = load_images(a.images)
    for (name, _), preds in zip(photos, predict(loaded, [img for _, img in photos], top=a.top)):
        print(name)
        for label, p in preds:
            print(f"  {p:6.1%}  {label}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}", file=sys.stderr)


def _cmd_sanity(a) -> None:
    from .report import run_sanity

    run_sanity(model=a.model, weights=_weights(a.weights), layer=a.layer, method=a.method, out=a.out,
               device=a.device, seed=a.seed)


def _cmd_finetune(a) -> None:
    from .finetune_report import run_finetune_report

    run_finetune_report(a.out, model=a.model, dataset=a.dataset, seed=a.seed, quick=a.quick)


def _cmd_experiments(a) -> None:
    from .report import run_experiments

    run_experiments(a.names, model=a.model, weights=_weights(a.weights), images=a.images, out=a.out,
                    device=a.device)


_COMMANDS = {"report": _cmd_report, "layers": _cmd_layers, "predict": _cmd_predict, "sanity": _cmd_sanity,
             "finetune": _cmd_finetune, "experiments": _cmd_experiments}


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"vizlearn: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    try:
        _COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `vizlearn layers | head`
        sys.stderr.close()
        return 0
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError, KeyError) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vizlearn: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
