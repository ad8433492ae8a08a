"""`python -m tests.kill_driver POINT N -- <tam_jax.main flags>`: run `tam_jax.main` and SIGKILL this process
at the N-th time it reaches POINT, to test recovery from hard kills (tests/test_interruptions.py).

Points: "step" (a train step dispatched), "log" (half-way through writing a train_log.jsonl line),
"checkpoint" (right after a checkpoint save started, while Orbax writes it in the background),
"checkpoint_file" (while Orbax writes one of a checkpoint's files), "validation" (inside a validation),
"results" (half-way through writing results.json).
"""

import os
import signal
import sys


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _countdown(n: int):
    remaining = [n]

    def tick() -> bool:
        remaining[0] -= 1
        return remaining[0] == 0

    return tick


def install(point: str, n: int) -> None:
    from tam_jax import checkpoints, evaluate, metrics_log, results, train

    due = _countdown(n)
    if point == "step":
        original = train.shard_batch
        train.shard_batch = lambda *a, **k: (_kill() if due() else None) or original(*a, **k)
    elif point == "log":
        original_write = metrics_log.MetricsLog.write

        def write(self, step, values, prefix):
            if due():
                with open(self.path, "a") as f:
                    f.write(f'{{"step": {step}, "lo')
                _kill()
            return original_write(self, step, values, prefix)

        metrics_log.MetricsLog.write = write
    elif point == "checkpoint":
        original_save = checkpoints.CheckpointManager.save

        def save(self, *a, **k):
            original_save(self, *a, **k)
            if due():
                _kill()

        checkpoints.CheckpointManager.save = save
    elif point == "checkpoint_file":
        from etils import epath

        original_write_text = epath.Path.write_text

        def write_text(self, *a, **k):
            result = original_write_text(self, *a, **k)
            if "checkpoints" in str(self) and due():
                _kill()
            return result

        epath.Path.write_text = write_text
    elif point == "validation":
        original_run = evaluate.FewShotEvaluator.run
        evaluate.FewShotEvaluator.run = lambda self, state: (
            (_kill() if due() else None) or original_run(self, state))
    elif point == "results":
        import json

        original_dump = json.dump

        def dump(obj, f, *a, **k):
            if isinstance(obj, list) and obj and "scorer" in obj[0] and due():
                f.write(json.dumps(obj)[:40])
                f.flush()
                _kill()
            return original_dump(obj, f, *a, **k)

        results.json.dump = dump
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, n = sys.argv[1], int(sys.argv[2])
    install(point, n)
    from absl import app

    from tam_jax import main

    sys.argv = [sys.argv[0], *sys.argv[4:]]  # drop POINT N --
    app.run(main.main)
