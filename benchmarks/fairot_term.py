"""Benchmark: fairot's Sinkhorn term alone, this checkout's against a previous ``probe/objectives.py``.

    .venv/bin/python benchmarks/fairot_term.py [--lanes 16] [--previous /path/to/old/objectives.py]

What one training step of a fairot sweep adds to groupdro's: the value and gradient of
``fairot_penalty`` (two groups, 64-row minibatches, scores uniform in [0, 1], ~30% of rows in
group 1), vmapped over ``--lanes`` lanes as the sweep's program runs them (16: the demo grid,
256: the paper grid). The timings are the fastest single call of each variant over interleaved
rounds: on a shared machine a call that was preempted is slower, never faster, so the minimum
is the one comparable number (the sweep's own wall time moves with the load; see
benchmarks/RESULTS.md, issue 27). ``--previous`` loads another objectives.py as a module of its
own, so both run in one process on the same inputs; it reads ``core.mitigations.SINKHORN`` at
call time for its annealing blurs, so ``--previous-anneal`` gives it the blurs it had (its
iteration counts are bound when it is loaded and are this checkout's unless changed here).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import numpy as np


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def step_fn(ob, rows: int, n_groups: int):
    import jax
    import jax.numpy as jnp

    def penalty(scores, group):
        ctx = ob.Context(jnp.ones(rows), jnp.zeros(rows, jnp.int32), group, jnp.float32(1), jnp.int32(0))
        return ob.fairot_penalty(scores, ctx, n_groups)

    return jax.jit(jax.vmap(jax.value_and_grad(penalty)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--previous", default=None, help="another probe/objectives.py to time beside this one")
    parser.add_argument("--previous-anneal", default=None, help="the previous file's annealing blurs, e.g. 0.1,0.03")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20, help="single calls per variant and round")
    args = parser.parse_args()
    import jax

    from cxrfair.probe import objectives

    variants = {"this": objectives}
    if args.previous:
        variants["previous"] = load(args.previous, "previous_objectives")
        if args.previous_anneal:
            blurs = tuple(float(e) for e in args.previous_anneal.split(","))
            variants["previous"].SINKHORN = dataclasses.replace(variants["previous"].SINKHORN, anneal=blurs)
    rng = np.random.default_rng(0)
    scores = jax.numpy.asarray(rng.uniform(size=(args.lanes, args.rows)), jax.numpy.float32)
    group = jax.numpy.asarray((rng.uniform(size=(args.lanes, args.rows)) < 0.3).astype(np.int32))
    fns = {name: step_fn(module, args.rows, 2) for name, module in variants.items()}
    for fn in fns.values():
        jax.block_until_ready(fn(scores, group))  # compile
    best = dict.fromkeys(fns, float("inf"))
    print(f"load average {os.getloadavg()[0]:.2f} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC", flush=True)
    for _ in range(args.rounds):
        for name, fn in fns.items():
            for _ in range(args.calls):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(scores, group))
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"load average {os.getloadavg()[0]:.2f} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    line = f"fairot term, {args.lanes} lanes of {args.rows} rows, fastest call: " + ", ".join(
        f"{name} {t * 1e3:.3f} ms" for name, t in best.items())
    if "previous" in best:
        line += f" | this / previous {best['this'] / best['previous']:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
