"""Classify new videos among classes given by a few example clips: the command line of `tam_jax.inference`.

    python -m tam_jax.predict --checkpoint runs/demo --support support/ --query a.mp4 frames_of_b/ \
        [--json predictions.json] [--save-support support.npz]
    python -m tam_jax.predict --checkpoint runs/demo --support-cache support.npz --query c.mp4

`--checkpoint` is a training workdir (its best checkpoint) or one `WORKDIR/checkpoints/<step>` folder.
`--support` holds `<class>/<clip>` entries (video files or frame folders, 1..k per class). Prints each
query's classes by ascending distance; `--json` writes

    {"predictions": [{"query": PATH, "ranking": [{"class": NAME, "distance": D}, ...]}, ...],
     "errors": [{"path": PATH, "error": MESSAGE}, ...]}

Unreadable clips (queries, or support clips of a class that has other readable ones) go to "errors" and
stderr and the rest is still classified (exit status 0). When none of the queries can be read, `--json`
is still written (its "errors" say why) and the status is 1. A support class without one readable clip,
a support cache made with another architecture, frame count or weights, or a bad checkpoint is a fatal
error (status 1, one `error:` line saying what to do). A support set of one class ranks every query
first in it: a `warning:` line says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from tam_jax import cli, errors, progress
from tam_jax.errors import UserError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tam_jax.predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir (its best checkpoint) or a WORKDIR/checkpoints/<step> folder")
    support = parser.add_mutually_exclusive_group(required=True)
    support.add_argument("--support", help="folder of <class>/<clip> entries (video files or frame folders)")
    support.add_argument("--support-cache", help="support embeddings written by --save-support")
    parser.add_argument("--query", nargs="+", default=[], metavar="PATH",
                        help="video files or frame folders to classify")
    parser.add_argument("--json", metavar="OUT", help="write predictions and errors as JSON")
    parser.add_argument("--save-support", metavar="FILE", help="write the support embeddings (.npz)")
    parser.add_argument("--scorer", help="a registered method (tam_jax.methods; default: the checkpoint's; a "
                        "learned one only if the checkpoint trained it)")
    parser.add_argument("--lam", type=cli.lam_value,
                        help="soft-min temperature, 0: hard (default: the checkpoint's)")
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None,
                        help="add the support->query alignment, TAM only (default: the checkpoint's)")
    parser.add_argument("--top", type=cli.int_at_least(1, "classes printed per query"), default=5,
                        help="classes printed per query (all are in --json)")
    parser.add_argument("--devices", type=cli.int_at_least(0, "0: all devices"), default=1,
                        help="devices to embed on (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.save_support and not args.support:
        parser.error("--save-support needs --support (the embeddings to save).")
    if not args.query and not args.save_support:
        parser.error("give --query PATH... (or --save-support FILE to only embed the support set).")
    return args


def format_predictions(result, top: int) -> str:
    """Text lines: each query, then its `top` nearest classes with their distances."""
    lines = []
    for prediction in result.predictions:
        lines.append(prediction.query)
        width = max(len(name) for name, _ in prediction.ranking[:top])
        for place, (name, distance) in enumerate(prediction.ranking[:top], 1):
            lines.append(f"  {place:>3}. {name:<{width}}  {distance:.4f}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (a finished file or none)."""
    from tam_jax.files import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def support_warnings_as_lines() -> Iterator[None]:
    """Each SupportWarning raised inside the block -> one `warning: MESSAGE` line on stderr; other
    warnings are shown as usual."""
    from tam_jax.inference import SupportWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SupportWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, SupportWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def check_some_query_read(payload: dict, queries: Sequence[str], json_path: str | None) -> None:
    """Raise a UserError when queries were given and not one of them could be read."""
    if queries and not payload["predictions"]:
        what = ("the query could not be read" if len(queries) == 1
                else f"none of the {len(queries)} queries could be read")
        listed = f"listed above and in {json_path}" if json_path else "listed above"
        raise UserError(f"{what} ({listed}); give readable video files or frame folders as --query.")


def run(args: argparse.Namespace) -> dict:
    """Classify as `args` say; returns the JSON payload. Raises on fatal errors."""
    from tam_jax.inference import FewShotClassifier, SupportSet

    classifier = FewShotClassifier.from_checkpoint(
        args.checkpoint, num_devices=args.devices, scorer=args.scorer, lam=args.lam,
        bidirectional=args.bidirectional, progress=not args.no_progress,
    )
    with support_warnings_as_lines():
        classifier.fit(SupportSet.load(args.support_cache) if args.support_cache else args.support)
    for error in classifier.support_errors:
        print(f"warning: support clip left out: {error.path}: {error.error}", file=sys.stderr)
    if args.save_support:
        Path(args.save_support).parent.mkdir(parents=True, exist_ok=True)
        classifier.support.save(args.save_support)
        print(f"Support embeddings of {len(classifier.support.class_names)} classes written to "
              f"{args.save_support}", file=sys.stderr)
    payload = {"predictions": [], "errors": [e.to_json() for e in classifier.support_errors]}
    if args.query:
        result = classifier.predict(args.query)
        for error in result.errors:
            print(f"error: query not classified: {error.path}: {error.error}", file=sys.stderr)
        if result.predictions:
            print(format_predictions(result, args.top))
        payload["predictions"] = result.to_json()["predictions"]
        payload["errors"] += result.to_json()["errors"]
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when some query was classified (or only --save-support was asked); 1 with an
    `error:` line for a bad input or when no query could be read; 2 for bad arguments."""
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO

    def body() -> None:
        with progress.hidden(args.no_progress):
            payload = run(args)
        if args.json:
            write_json(args.json, payload)
        check_some_query_read(payload, args.query, args.json)

    return errors.run_command(body, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
