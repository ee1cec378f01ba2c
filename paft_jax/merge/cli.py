"""`merge` and `sparsity` subcommands; `register(subparsers)` adds them to `paft_jax.launch`.

Also runnable alone: `python -m paft_jax.merge.cli merge --config recipe.yaml --out DIR`.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("paft_jax")


def _parse_kv(items: list[str] | None, what: str) -> dict:
    import yaml
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def recipe_from_args(args):
    """A `Recipe` from --config, or from the flag form (--method, --base, --model, --weight, --density)."""
    from paft_jax.merge.recipe import load_recipe
    if args.config:
        if args.method or args.model:
            raise ValueError("give either --config or --method/--base/--model, not both")
        recipe = load_recipe(args.config)
        recipe.spec.accept_config += tuple(args.accept_config_difference or ())
        return recipe
    if not args.method or not args.model:
        raise ValueError("merge needs --config RECIPE.yaml, or --method with --base and --model ...")
    n = len(args.model)
    for flag, vals in (("--weight", args.weight), ("--density", args.density)):
        if vals and len(vals) not in (1, n):
            raise ValueError(f"{flag} given {len(vals)} times for {n} --model(s); give it once or once per model")
    models = []
    for i, m in enumerate(args.model):
        p = {}
        if args.weight:
            p["weight"] = args.weight[i if len(args.weight) > 1 else 0]
        if args.density:
            p["density"] = args.density[i if len(args.density) > 1 else 0]
        models.append({"model": m, "parameters": p})
    data = {"merge_method": args.method, "models": models, "parameters": _parse_kv(args.param, "--param")}
    if args.base:
        data["base_model"] = args.base
    if args.dtype:
        data["dtype"] = args.dtype
    if args.skip:
        data["overrides"] = [{"pattern": p, "skip": True} for p in args.skip]
    if args.accept_config_difference:
        data["accept_config_differences"] = list(args.accept_config_difference)
    return load_recipe(data, where="command line")


def cmd_merge(args) -> int:
    from paft_jax.hf.verifier import start_verifier
    recipe = recipe_from_args(args)
    if args.dtype and args.config:
        recipe.spec.dtype = args.dtype
    base = recipe.base or recipe.models[0]  # linear needs no base: models[0] then only supplies names/config
    models = recipe.models
    # the verification's process starts before this one imports JAX: its own imports are most of its time
    verifier = start_verifier(args.atol, base) if args.verify else None
    from paft_jax.merge.engine import merge_to_hf
    res = merge_to_hf(recipe.spec, base, models, args.out, recipe_text=recipe.text,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify,
                      atol=args.atol, verifier=verifier)
    print(f"merged {res.tensors} tensors ({recipe.spec.method}, {len(models)} model(s)) into {res.out} "
          f"in {res.seconds:.1f}s")
    if res.verify is not None:
        print(res.verify)
    return 0


def cmd_sparsity(args) -> int:
    from paft_jax.merge.sparsity import analyze, format_table, plot
    from paft_jax.publish import check_output_file
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before the work, not after it
        if path:
            check_output_file(path, flag)
    rep = analyze(args.base, args.model, tolerances=args.tol, relative=not args.absolute)
    print(format_table(rep, per_tensor=args.per_tensor))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge models into a base (TIES, DARE, task arithmetic, ...), streamed",
                       description="Merge fine-tuned models (HF safetensors directories) into their base, tensor "
                                   "by tensor, into a verified HF directory. Takes mergekit's YAML recipes "
                                   "(merge_method, base_model, models[].parameters, parameters, dtype) or flags.")
    p.add_argument("--config", default=None, help="mergekit-format recipe YAML")
    p.add_argument("--out", required=True, help="output directory (written atomically; never one of the inputs)")
    p.add_argument("--method", default=None, help="flag form: merge method (ties, dare_ties, task_arithmetic, ...)")
    p.add_argument("--base", default=None, help="flag form: base model directory")
    p.add_argument("--model", action="append", default=None, help="flag form: a model directory (repeat)")
    p.add_argument("--weight", type=float, action="append", default=None, help="flag form: weight (once or per model)")
    p.add_argument("--density", type=float, action="append", default=None,
                   help="flag form: density (once or per model)")
    p.add_argument("--param", action="append", default=None,
                   help="flag form: global parameter KEY=VALUE (normalize, lambda, rescale, t, seed, ...)")
    p.add_argument("--skip", action="append", default=None,
                   help="flag form: keep the base's tensors matching this glob (e.g. 'model.embed_tokens.*')")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: the recipe's dtype, else the base's)")
    p.add_argument("--accept-config-difference", action="append", default=None, metavar="KEY",
                   help="a config.json key (dotted when nested, e.g. rope_scaling.factor) the models may have "
                        "another value of than the base (repeat); any other difference is refused")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds a previous paft_jax export (nothing else is ever replaced)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading the result with transformers and comparing logits")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logits diff| in verification")
    p.set_defaults(fn=cmd_merge, func=cmd_merge)

    p = sub.add_parser("sparsity", help="how sparse the deltas of models from a base are, per tensor and module",
                       description="Per tensor and module type: exact-zero fraction of model - base, fraction "
                                   "under tolerances, L1/L2 norms; sign agreement between two deltas.")
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--model", action="append", required=True, help="fine-tuned model directory (repeat)")
    p.add_argument("--tol", type=float, action="append", default=None,
                   help="tolerance for 'near zero' (repeat; default 1e-6, 1e-4, 1e-3)")
    p.add_argument("--absolute", action="store_true",
                   help="tolerances are absolute |delta| <= tol (default: relative, |delta| <= tol * |base|)")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only module types")
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.set_defaults(fn=cmd_sparsity, func=cmd_sparsity)


def main(argv: list[str] | None = None) -> int:
    from paft_jax.cli_common import OneLineErrorParser
    parser = OneLineErrorParser(prog="python -m paft_jax.merge.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    from paft_jax.cli_common import run
    sys.exit(run(main))
