"""``surgery lm-eval ARGS...``: lm-eval's own command line, able to load directories written by ``surgery.save``.

A saved directory's ``config.json`` has ``model_type: surgery``, which transformers only knows once
``surgery.register_auto_classes()`` has run. This command registers the classes, then hands every argument, as
given, to lm-eval's CLI, so that ``--model hf --model_args pretrained=DIR`` loads the converted model (its base
architecture with the plan re-applied) and every other lm-eval option works unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval with ``argv`` (default: ``sys.argv[1:]``); returns its exit status."""
    from surgery.artifacts import register_auto_classes

    register_auto_classes()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:  # lm-eval is a dependency; a broken install should say so in one line
        print(f"surgery lm-eval: error: lm-eval cannot be imported ({exc})", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval parses sys.argv itself (it inserts its default "run" subcommand there), so it must see our arguments.
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors and --help end here; keep their status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
