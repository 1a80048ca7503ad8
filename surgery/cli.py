"""``surgery`` command line: thin commands over the Python API.

A mistake a user can make (any ``surgery.errors.SurgeryError``: plan, plugin, model path, data, output directory)
exits with code 2 and its located message; ``-v`` shows the traceback. Other failures exit with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn
from pathlib import Path

from surgery.errors import SurgeryError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_check(args: argparse.Namespace) -> int:
    import surgery

    plan = surgery.load_plan(args.plan)
    matches = surgery.check(plan)
    rows = [[str(m.layer), m.path, m.module_class, m.mixer, m.weights] for m in matches]
    print(_table(rows, ["layer", "module", "class", "mixer", "weights"]))
    print(f"\n{len(matches)} layer(s) converted; plan OK")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    import surgery
    from surgery.pipeline import convert_command

    out = convert_command(surgery.load_plan(args.plan), output=args.output, force=args.force)
    rec = json.loads((out / "manifest.json").read_text())["layers"]
    count = lambda key: sum(len(r[key]) for r in rec)  # noqa: E731
    print(f"converted {len(rec)} layer(s): {count('copied')} tensors copied, {count('reshaped')} reshaped, "
          f"{count('created')} created new, {count('dropped')} dropped")  # fmt: skip
    print(f"saved to {out}")
    return 0


def cmd_plugins_list(args: argparse.Namespace) -> int:
    from surgery.registry import load_registry

    rows = load_registry(strict=False).plugins()  # a broken plugin is listed with its error, not fatal
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    table = [[r.plugin, f"{r.distribution} {r.version}", ", ".join(r.mixers), ", ".join(r.weight_maps),
              ", ".join(r.stages)] for r in rows if r.error is None]  # fmt: skip
    print(_table(table, ["plugin", "distribution", "mixers", "weight maps", "stages"]))
    for r in rows:
        if r.error is not None:
            print(f"BROKEN {r.plugin} ({r.distribution} {r.version}): {r.error}")
    return 0


def cmd_plugins_catalogue(args: argparse.Namespace) -> int:
    import yaml

    from surgery.registry import catalogue, load_registry

    print(yaml.safe_dump(catalogue(load_registry(autoload=False)), sort_keys=False, width=119), end="")
    return 0


def cmd_plan_schema(args: argparse.Namespace) -> int:
    from surgery.plan import plan_json_schema

    print(json.dumps(plan_json_schema(), indent=1))
    return 0


def cmd_fetch_demo(args: argparse.Namespace) -> int:
    from surgery.demo import default_root, prepare_demo
    from surgery.outputs import OutputError, OutputLock, refuse_link

    root = Path(args.root) if args.root else default_root()
    refuse_link(root / "smollm2-135m", "the demo's model directory")
    refuse_link(root / "data", "the demo's data directory")
    if root.exists() and not root.is_dir():
        raise OutputError(f"--root {root} is a file, not a directory")
    with OutputLock(root, name=".surgery-demo.lock"):  # two fetch-demo runs never build one root at once
        model_dir, data = prepare_demo(root)
    print(f"model: {model_dir}\ndata:  {data.root}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    import surgery
    from surgery.pipeline import recover_command

    path = recover_command(surgery.load_plan(args.plan), restart=args.restart, force=args.force)
    print(f"recovered model saved to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import surgery
    from surgery.evaluate import format_table
    from surgery.pipeline import eval_command

    if args.limit is not None and not (0 < args.limit < 2**31):
        from surgery.errors import PlanError

        raise PlanError([("--limit", f"{args.limit}: documents per task (>= 1) or a fraction (< 1), above 0")])
    print(format_table(eval_command(surgery.load_plan(args.plan), limit=args.limit)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import surgery

    surgery.run(surgery.load_plan(args.plan), force=args.force)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from surgery.errors import PlanError
    from surgery.generate import run_generate

    if args.max_new_tokens < 1:
        raise PlanError([("--max-new-tokens", f"{args.max_new_tokens}: generate at least one token")])

    write = lambda text: print(text, end="", flush=True)  # noqa: E731
    res = run_generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, capture=args.capture,
                       device=args.device, dtype=args.dtype, write=write)  # fmt: skip
    if len(args.prompt) > 1:
        print("\n(streamed the first prompt; all rows were decoded together)", end="")
    print(f"\n[{res.new_tokens.numel()} new tokens, batch {res.new_tokens.shape[0]}: {res.tokens_per_s:.1f} tok/s "
          f"decoding ({res.mode}), prefill {1000 * res.prefill_s:.0f} ms]")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from surgery.select import select

    damage, _ = select(args.plan, args.keep, tokens=args.tokens, out=args.out, seq_len=args.seq_len, data=args.data,
                       ranking=args.ranking)  # fmt: skip
    rows = [[str(i), f"{damage.kl[i]:.4f}", "softmax" if i in damage.keep(args.keep) else ""] for i in damage.ranking]
    print(_table(rows, ["layer", "KL to base (nats/token)", "kept"]))
    if args.out:
        print(f"hybrid plan written to {args.out}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from surgery.lm_eval_cli import main as lm_eval_main

    return lm_eval_main(args.args)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one located line (``surgery convert: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="surgery", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, plan: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if plan:
            sp.add_argument("plan", help="plan file (YAML)")
        sp.set_defaults(fn=fn)
        return sp

    force = "write into a non-empty directory that surgery did not create (nothing of yours is deleted)"
    add("check", cmd_check, "validate a plan against its model (meta device): layer -> module -> mixer -> mapping")
    conv = add("convert", cmd_convert, "convert the plan's model and save it to <output>/convert")
    conv.add_argument("-o", "--output", help="save here instead")
    conv.add_argument("--force", action="store_true", help=force)
    rec = add("recover", cmd_recover, "recover the converted model (plan section recover:); save it to <output>/model")
    rec.add_argument("--restart", action="store_true", help="start over; an earlier run is moved aside, not deleted")
    rec.add_argument("--force", action="store_true", help=force)
    add("eval", cmd_eval, "lm-eval: base and converted model side by side").add_argument("--limit", type=float)
    add("run", cmd_run, "convert -> recover -> eval -> save into the plan's output directory").add_argument(
        "--force", action="store_true", help=force)  # fmt: skip
    gen = add("generate", cmd_generate, "greedy decoding of a saved model over the static cache; streams, prints tok/s",
              plan=False)  # fmt: skip
    gen.add_argument("run_dir", help="a saved model directory, or a run directory with model/ or convert/")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--capture", choices=["graph", "compile", "eager"], default="graph",
                     help="decode step as a CUDA graph (default), torch.compile reduce-overhead, or eager")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", help="float32, bfloat16, ... (default: the plan's)")
    sel = add("select", cmd_select, "rank layers by how much converting each alone moves the output; write a hybrid "
              "plan keeping the K worst as softmax attention")  # fmt: skip
    sel.add_argument("--keep", type=int, required=True, help="layers to keep as softmax attention")
    sel.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    sel.add_argument("--seq-len", type=int, help="calibration chunk length (default: the plan's recover.data.seq_len, "
                     "else 512); longer chunks weigh the long-range dependence a window or memory loses")
    sel.add_argument("--data", help="calibration text (a .txt/.jsonl file or directory, or a hub dataset); default: "
                     "the plan's recover.data")
    sel.add_argument("-o", "--out", help="write the hybrid plan here (YAML), and nothing else")
    sel.add_argument("--ranking", help="write the per-layer KL and the ranking here (JSON)")
    add("fetch-demo", cmd_fetch_demo, "build the offline demo model and data", plan=False).add_argument("--root")
    (lm := sub.add_parser("lm-eval", help="lm-eval's own CLI; --model_args pretrained=DIR reads saved models", prefix_chars="\0", add_help=False)).set_defaults(fn=cmd_lm_eval) or lm.add_argument("args", nargs=argparse.REMAINDER)  # every argument, even -h, goes to lm-eval  # fmt: skip
    plugins = sub.add_parser("plugins", help="plugin commands").add_subparsers(dest="sub", required=True)
    pl = plugins.add_parser("list", help="every plugin with its distribution and version")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plugins_list)
    cat = plugins.add_parser("catalogue", help="YAML catalogue of the built-ins (registry.yaml)")
    cat.set_defaults(fn=cmd_plugins_catalogue)
    plan = sub.add_parser("plan", help="plan file commands").add_subparsers(dest="sub", required=True)
    plan.add_parser("schema", help="print the plan's JSON Schema").set_defaults(fn=cmd_plan_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and -h: argparse has printed them; callers in-process get the code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.fn(args) or 0)
    except SurgeryError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"surgery {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        else:
            print(f"surgery {args.command}: {type(exc).__name__}: {exc}\n(run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
