"""The lm_eval fitness per candidate, against lm-eval's own two ways of scoring the same model.

Usage::

    python benchmarks/lm_eval_fitness.py --json [--repeats 5] [--threads 1]

Built here (nothing downloaded): a random two-layer Llama (hidden 64) with the character tokenizer
of ``evomerge.models.zoo.tiny_lm``, and the tiny local tasks of ``evomerge.testing.harness_tasks``:
100 documents (60 multiple choice, 180 log-likelihood requests; 20 greedy generations with a regex
filter; 20 answer log-likelihoods). Before every timed call the resident model's weights are nudged in place, as a new
candidate would be written into them. Medians over ``--repeats`` rounds; the three paths take
turns within a round, so load on the machine falls on all of them alike.

* ``seconds_per_candidate``: ``lm_eval_fitness`` on every document (tasks built once, the resident
  model wrapped as ``HFLM``, per-document scores read from the logged samples).
* ``prebuilt_seconds``: the floor: ``lm_eval.evaluator.evaluate`` on a task dict loaded once and
  one ``HFLM`` around the same resident model, ``log_samples=True``, ``bootstrap_iters=0``.
* ``simple_evaluate_seconds``: the mergekit-evolve way: ``save_pretrained`` of the model and its
  tokenizer into a fresh directory, then ``lm_eval.simple_evaluate(model="hf", model_args=
  "pretrained=DIR,dtype=float32")`` with a ``TaskManager`` (indexing only the local tasks) made once,
  so the tasks are loaded again per candidate and the model reloaded from disk.
* ``ratio_vs_prebuilt`` = seconds_per_candidate / prebuilt_seconds (target ≤ 1.1);
  ``speedup_vs_simple_evaluate`` = simple_evaluate_seconds / seconds_per_candidate (target ≥ 3).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON figures")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray worker's cpus_per_worker)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import datasets
    import transformers
    from lm_eval.evaluator import evaluate, simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.fitness import own_examples
    from evomerge.fitness.harness import FEWSHOT_SEED, lm_eval_fitness
    from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
    from evomerge.testing.harness_tasks import TASK_NAMES, tiny_task_dir

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    root = Path(tempfile.mkdtemp(prefix="evomerge-bench-lmeval-"))
    try:
        options = {"tasks": list(TASK_NAMES), "include_path": str(tiny_task_dir(root / "tasks"))}
        tokenizer = build_tokenizer()
        model = tiny_llama(tokenizer, hidden=64, layers=2, heads=2, seed=0).eval()
        documents = own_examples("lm_eval", options)
        manager = TaskManager(include_path=options["include_path"], include_defaults=False)
        prebuilt = manager.load(list(TASK_NAMES))
        for task in prebuilt["tasks"].values():
            task.set_config(key="num_fewshot", value=0)
        prebuilt_lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu")
        generator = torch.Generator().manual_seed(0)

        def next_candidate() -> None:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=generator))

        def ours() -> None:
            lm_eval_fitness(model, tokenizer, documents, batch_size=16, **options)

        def floor() -> None:
            for task in prebuilt["tasks"].values():
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            evaluate(prebuilt_lm, prebuilt, log_samples=True, bootstrap_iters=0)

        def mergekit_evolve_way() -> None:
            out = Path(tempfile.mkdtemp(dir=root))
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            simple_evaluate(
                model="hf", model_args=f"pretrained={out},dtype=float32", tasks=list(TASK_NAMES), batch_size=16,
                device="cpu", task_manager=manager, log_samples=True, bootstrap_iters=0,
            )
            shutil.rmtree(out)

        ours(), floor()  # first calls: imports, lazy dataset reads
        times: dict[str, list[float]] = {"ours": [], "floor": [], "simple": []}
        for _ in range(args.repeats):
            for key, fn in (("ours", ours), ("floor", floor), ("simple", mergekit_evolve_way)):
                next_candidate()
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    per_candidate, prebuilt_s, simple_s = (statistics.median(times[k]) for k in ("ours", "floor", "simple"))
    figures = {
        "documents": len(documents),
        "seconds_per_candidate": round(per_candidate, 4),
        "prebuilt_seconds": round(prebuilt_s, 4),
        "simple_evaluate_seconds": round(simple_s, 4),
        "ratio_vs_prebuilt": round(per_candidate / prebuilt_s, 3),
        "speedup_vs_simple_evaluate": round(simple_s / per_candidate, 2),
        "repeats": args.repeats,
        "threads": args.threads,
    }
    if not args.json:
        print("targets: ratio_vs_prebuilt <= 1.1, speedup_vs_simple_evaluate >= 3", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
