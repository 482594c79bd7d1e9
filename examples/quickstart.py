"""meshrun quickstart: a training function and a command, run as jobs on this machine.

    python examples/quickstart.py

With no GPU it runs CPU jobs. With GPUs (found by nvidia-smi, or declared with MESHRUN_GPUS="0,1") it also
runs a GPU job, which sees only the GPU meshrun leased to it.
"""

from __future__ import annotations

import os
import sys

import meshrun


@meshrun.job(cpus=1, name="train")
def train(lr: float, steps: int = 200) -> dict:
    """A stand-in for a training loop: plain Python, runs as its own process."""
    import socket

    w, losses = 0.0, []
    for _ in range(steps):  # minimise (w - 3)^2 by gradient descent
        grad = 2 * (w - 3.0)
        w -= lr * grad
        losses.append((w - 3.0) ** 2)
    return {
        "lr": lr,
        "final_loss": losses[-1],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def main() -> int:
    print(f"meshrun {meshrun.__version__}; job store: {meshrun.get_config().home}")

    # 1. one function job: submit, then wait for its return value
    job = train.submit(0.1)
    print(f"submitted {job.id} to {job.backend}")
    result = job.result(timeout=300)
    print(f"  -> {result}")

    # 2. a sweep: one job per learning rate
    jobs = train.map([0.001, 0.01, 0.1])
    for j, r in zip(jobs, meshrun.gather(jobs, timeout=300)):
        print(f"  {j.id} lr={r['lr']:<6} final loss {r['final_loss']:.3g}")

    # 3. a command job, its output read back
    cmd = meshrun.run([sys.executable, "-c", "import platform; print('hello from', platform.node())"], name="hello")
    cmd.wait(timeout=300)
    print(f"  {cmd.id} {cmd.status().value}: {cmd.logs().strip()}")

    # 4. a GPU job, if this machine has (or declares) GPUs: it sees exactly the GPU it leased
    gpus = meshrun.get_backend("local").gpus()["gpus"]
    if gpus:
        gpu_job = train.options(gpus=1).submit(0.1)
        r = gpu_job.result(timeout=300)
        print(f"  GPU job {gpu_job.id} ran with CUDA_VISIBLE_DEVICES={r['CUDA_VISIBLE_DEVICES']} "
              f"(this machine has {len(gpus)} GPU(s))")
    else:
        print("  no GPUs here: set MESHRUN_GPUS=0,1 to declare some and see a masked GPU job")

    print("see them all with: meshrun ls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
