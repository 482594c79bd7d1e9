"""A hyperparameter sweep: one job per (learning rate, momentum) pair with `@meshrun.job` and `.map`, the
results gathered into a table, best first.

    python examples/sweep.py

Each point runs as its own job: on this machine by default, one Slurm job array with
`MESHRUN_BACKEND=slurm` (or `@meshrun.job(backend="slurm", ...)`), wherever placement puts it otherwise.
A point that fails does not lose the others: its row says why.
"""

from __future__ import annotations

import itertools
import sys

import meshrun


@meshrun.job(cpus=1, name="sweep-point", time_limit="10m")
def train(lr: float, momentum: float, steps: int = 100) -> dict[str, float]:
    """Gradient descent with momentum on a badly conditioned quadratic: a stand-in for a training run."""
    if lr > 1.0:
        raise ValueError(f"lr={lr} is too large: the run would diverge")
    x, y, vx, vy = 5.0, 5.0, 0.0, 0.0
    for _ in range(steps):
        gx, gy = 2 * 0.05 * x, 2 * 1.0 * y  # f(x, y) = 0.05 x^2 + y^2
        vx, vy = momentum * vx - lr * gx, momentum * vy - lr * gy
        x, y = x + vx, y + vy
    return {"loss": 0.05 * x * x + y * y}


def main() -> int:
    grid = list(itertools.product([0.01, 0.1, 0.5, 2.0], [0.0, 0.9]))
    jobs = train.map([lr for lr, _ in grid], [m for _, m in grid])
    print(f"submitted {len(jobs)} jobs to {jobs[0].backend}")
    meshrun.wait(jobs, timeout=600)

    rows = []
    for (lr, momentum), job in zip(grid, jobs):
        try:
            rows.append((job.result()["loss"], lr, momentum, job.id, ""))
        except meshrun.JobFailed as e:
            rows.append((float("inf"), lr, momentum, job.id, str(e).splitlines()[-1]))
    rows.sort()
    print(f"{'lr':>6} {'momentum':>8} {'loss':>10}  job")
    for loss, lr, momentum, job_id, error in rows:
        shown = f"{loss:.3g}" if not error else "failed"
        print(f"{lr:>6} {momentum:>8} {shown:>10}  {job_id}  {error}".rstrip())
    best = rows[0]
    print(f"best: lr={best[1]} momentum={best[2]} (loss {best[0]:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
