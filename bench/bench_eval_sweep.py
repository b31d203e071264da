"""Wall time of the evaluation sweep on the tiny random-weight SD pipeline (CPU), split into loading, sampling,
reward scoring and DINO embedding, and a rerun with one more schedule against the first run, side by side.

    python bench/bench_eval_sweep.py [--prompts 4] [--images 5] [--steps 10] [--resolution 32] [--threads 1]

The models are tests/ fixtures (random weights, nothing downloaded): the numbers show where the sweep's own time
goes and what the cache saves, not the speed of a real SD1.5 sweep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eval_fixtures import eval_config
    from rdt_lib.eval import run_sweep
    from rdt_lib.eval.config import DEFAULT_SCHEDULES
    from rdt_lib.eval.prompts import DEFAULT_PROMPTS

    out = Path(tempfile.mkdtemp(prefix="rdt_bench_eval_")) / "run"
    common = {"prompts.text": list(DEFAULT_PROMPTS[:args.prompts]), "prompts.images_per_prompt": args.images,
              "sampling.steps": args.steps, "sampling.resolution": args.resolution, "run.batch_size": 4}
    runs = []
    for label, schedules in (("first run", list(DEFAULT_SCHEDULES)),
                             ("rerun + power:3", list(DEFAULT_SCHEDULES) + ["power:3"])):
        config = eval_config(out, **{**common, "schedules.names": schedules})
        t0 = time.perf_counter()
        result = run_sweep(config, log=lambda msg: None)
        wall = time.perf_counter() - t0
        runs.append((label, wall, result))
        t = result.timings
        print(f"{label:16s} {len(schedules)} schedules x {args.prompts} prompts x {args.images} seeds: wall {wall:6.2f} s"
              f" | loading {t['loading']:5.2f} sampling {t['sampling']:6.2f} ({result.sampled} images) scoring "
              f"{t['scoring']:5.2f} embedding {t['embedding']:5.2f} outputs {t['outputs']:5.2f}")
    first, rerun = runs[0][1], runs[1][1]
    print(f"rerun / first run wall time: {rerun / first:.2f} (rerun sampled {runs[1][2].sampled} of "
          f"{len(runs[1][2].rows) * args.prompts * args.images} images)")


if __name__ == "__main__":
    main()
