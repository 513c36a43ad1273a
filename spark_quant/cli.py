"""The ``spark-quant`` command: one subcommand per pipeline stage.

    spark-quant proxy     --out DIR --size tiny|full [--weights random|trained]   build the embedded default model
    spark-quant calibrate [-e EXPERIMENT] [--set k=v]     stage 1 (quantization env)
    spark-quant quantize  [-e EXPERIMENT] [--recipe R]    stage 2 (quantization env)
    spark-quant eval      [-e EXPERIMENT]                 stage 3 (serving env; vLLM in a subprocess)
    spark-quant publish   --repo-id NS/NAME [--dry-run]   stage 4: model card + upload (quantization env)
    spark-quant validate  FILE...                         check experiments / recipes without a model
    spark-quant serving-profile --model DIR [--out DIR]   Spark serving profile: output head over emittable tokens
    spark-quant sweep     EXPERIMENT... [--out DIR]       run several experiments, one comparison table + plot
    spark-quant compare   RESULTS... --out DIR            the comparison alone, from finished eval folders

Errors a user can fix print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spark_quant.errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--experiment", type=Path, default=None,
                   help="experiment YAML (default: experiments/spark-tts_w8a8_int8.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an experiment field, e.g. --set calibration.num_samples=64 (repeatable)")
    p.add_argument("--model", type=Path, default=None, help="Spark-TTS model folder (overrides the experiment)")
    p.add_argument("--recipe", type=Path, default=None, help="llm-compressor recipe YAML (overrides the experiment)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: derived from the experiment name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished output folder")


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"{v} is outside 0 <= seed < 2**63")
    return v


def _os_error(e: OSError) -> str | None:
    """One line for the OS refusing a write (permissions, read-only or full disk); None for anything else."""
    import errno

    why = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system",
           errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}.get(e.errno)
    if why is None:
        return None
    where = e.filename or "a file"
    return (f"{where}: {why}; choose another --out (or free space / fix the permissions) and rerun: finished "
            "outputs are untouched")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spark-quant", description="INT8 Spark-TTS: calibrate, quantize, evaluate.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("proxy", help="build the embedded Spark-compatible default model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=_seed, default=0, help="0 <= seed < 2**63")
    p.add_argument("--weights", choices=["random", "trained"], default="random",
                   help="random init, or trained on a synthetic Spark language (a few CPU minutes at tiny)")

    _common(sub.add_parser("calibrate", help="stage 1: write calibration samples"))
    p = sub.add_parser("quantize", help="stage 2: apply an llm-compressor recipe")
    _common(p)
    p.add_argument("--calibration", type=Path, default=None, help="calibration folder (default: from the experiment)")
    p = sub.add_parser("eval", help="stage 3: baseline vs quantized under vLLM")
    _common(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="quantized checkpoint folder (default: from the experiment)")

    p = sub.add_parser("publish", help="stage 4: stage the release with its model card and upload it to a hub")
    p.add_argument("-e", "--experiment", type=Path, default=None, help="experiment YAML (names the default folders)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--repo-id", required=True, help="hub repo NAMESPACE/NAME, e.g. you/Spark-TTS-0.5B-W8A8-int8")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: from the experiment)")
    p.add_argument("--results", type=Path, default=None, help="eval results folder (default: from the experiment)")
    p.add_argument("--out", type=Path, default=None, help="staged release folder (default: build/release/<checkpoint>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--dry-run", action="store_true", help="stage the release and print the file plan; upload nothing")
    p.add_argument("--force", action="store_true", help="publish without eval results or with failed eval gates")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--license", default=None, help="license id for the card (default: the source model's)")
    p.add_argument("--retries", type=int, default=3, help="attempts when the network fails (default 3)")

    p = sub.add_parser("compare", help="one table + plot from several finished eval folders")
    p.add_argument("results", nargs="+", type=Path, help="eval folders (eval/results/<experiment>)")
    p.add_argument("--out", type=Path, required=True, help="folder for comparison.md/.json and the plot")
    p.add_argument("--paired", type=Path, default=None, help="a paired speed run's paired.json to fold in")
    p = sub.add_parser("sweep", help="calibrate, quantize and eval several experiments, then compare them")
    p.add_argument("experiments", nargs="+", type=Path, help="experiment YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field in every experiment (repeatable)")
    p.add_argument("--out", type=Path, default=Path("eval/sweeps/latest"), help="comparison folder")
    p.add_argument("--paired-speed", default=None, metavar="CELLS",
                   help="then time BF16 and every checkpoint paired, e.g. b1=1:200,c256=256:128")
    p.add_argument("--paired-trials", type=int, default=20, help="alternated rounds per paired cell (default 20)")
    p.add_argument("--paired-parallel-start", type=float, default=None, metavar="GIB",
                   help="start the paired step's engines all at once, each with a KV cache of GIB")
    p.add_argument("--paired-first", action="store_true",
                   help="time them paired right after quantizing, before the evals (short device time: speed first)")

    p = sub.add_parser("serving-profile", help="Spark serving profile of a model or quantized checkpoint folder")
    p.add_argument("--model", type=Path, required=True, help="Spark-TTS folder with LLM/ (model or checkpoint)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <model>-spark-profile beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished output folder")

    p = sub.add_parser("validate", help="check experiment and recipe files without loading a model")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--fields", action="store_true", help="list every experiment field with its default")
    return ap


def _experiment(args: argparse.Namespace):
    from spark_quant.config import DEFAULT_EXPERIMENT, load_experiment

    overrides = list(args.overrides)
    if args.model is not None:
        overrides.append(f"model={args.model}")
    if args.recipe is not None:
        overrides.append(f"recipe={args.recipe}")
    path = args.experiment
    if path is None and DEFAULT_EXPERIMENT.is_file():
        path = DEFAULT_EXPERIMENT
    return load_experiment(path, overrides)


def validate(files: list[Path], fields: bool) -> int:
    from spark_quant.config import describe_fields, load_experiment

    if fields:
        for name, default, desc in describe_fields():
            print(f"{name:<38} {default:<40} {desc}")
    bad = 0
    for f in files:
        try:
            if _is_recipe(f):
                _validate_recipe(f)
            else:
                exp = load_experiment(f)
                if not Path(exp.recipe).is_file():
                    raise UserError(f"{f}: recipe: {exp.recipe} not found")
                _validate_recipe(Path(exp.recipe))
            print(f"ok  {f}")
        except UserError as e:
            print(f"BAD {e}")
            bad += 1
    return 1 if bad else 0


def _is_recipe(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return "recipes" in path.parts
    if isinstance(data, dict) and data:
        return any(isinstance(v, dict) and any(k.endswith("_modifiers") for k in v) for v in data.values()) \
            or "recipes" in path.parts
    return "recipes" in path.parts


def _validate_recipe(path: Path) -> None:
    """llm-compressor's own check (here or in the quantization environment), else a structural one."""
    from spark_quant.stages.recipes import check_recipe

    how = check_recipe(path)
    if not how.startswith("llm-compressor"):
        print(f"    {path}: {how}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.cmd == "proxy":
            if args.weights == "trained":
                from spark_quant.models.trained import build_trained_proxy as build_proxy
            else:
                from spark_quant.models.proxy import build_proxy

            out = build_proxy(args.out, size=args.size, seed=args.seed)
            print(f"proxy: {out}")
        elif args.cmd == "compare":
            from spark_quant.stages.sweep import compare

            compare(args.results, args.out, paired=args.paired)
        elif args.cmd == "sweep":
            from spark_quant.stages.sweep import sweep

            sweep(args.experiments, args.overrides, args.out, args.paired_speed, args.paired_trials, args.paired_first,
                  args.paired_parallel_start)
        elif args.cmd == "serving-profile":
            from spark_quant.models.serving_profile import build_profile

            build_profile(args.model, out=args.out, overwrite=args.overwrite)
        elif args.cmd == "validate":
            return validate(args.files, args.fields)
        elif args.cmd == "calibrate":
            from spark_quant.stages.calibrate import calibrate

            calibrate(_experiment(args), out=args.out, overwrite=args.overwrite)
        elif args.cmd == "quantize":
            from spark_quant.stages.quantize import quantize

            quantize(_experiment(args), calib_dir=args.calibration, out=args.out, overwrite=args.overwrite)
        elif args.cmd == "eval":
            from spark_quant.stages.evaluate import evaluate

            evaluate(_experiment(args), ckpt_dir=args.checkpoint, out=args.out, overwrite=args.overwrite)
        elif args.cmd == "publish":
            from spark_quant.stages.publish import publish

            args.model = args.recipe = None
            publish(_experiment(args), args.repo_id, ckpt_dir=args.checkpoint, results_dir=args.results, out=args.out,
                    dry_run=args.dry_run, force=args.force, private=args.private, revision=args.revision,
                    commit_message=args.commit_message, license_=args.license, retries=max(1, args.retries),
                    overwrite=args.overwrite)
        return 0
    except UserError as e:
        if args.debug:
            raise
        print(f"spark-quant: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        line = _os_error(e)
        if line is None or args.debug:
            if args.debug:
                raise
            return _internal(e)
        print(f"spark-quant: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spark-quant: interrupted; finished outputs are untouched", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        return _internal(e)


def _internal(e: BaseException) -> int:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    print(f"spark-quant: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
