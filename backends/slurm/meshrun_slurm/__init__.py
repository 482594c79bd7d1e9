"""meshrun backend for Slurm: batch jobs through sbatch, GPUs through gres, multi-node jobs as one srun step,
``.map`` as one job array, and status that agrees with Slurm.

    [backends.slurm]
    partition = "gpu"                 # defaults for every job (backend_options["slurm"] overrides per job)
    account = "lab"
    login_host = "login.cluster"      # optional: submit through a login node over SSH

Importing this package is cheap: nothing talks to Slurm before a backend method is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import meshrun.backend as mb

__version__ = "0.1.0"
__all__ = ["SlurmBackend", "render_script", "BatchJob", "ArrayPart", "sbatch_quote", "STATES", "__version__"]

_LAZY = {
    "SlurmBackend": "._backend",
    "render_script": "._script",
    "BatchJob": "._script",
    "ArrayPart": "._script",
    "sbatch_quote": "._script",
    "STATES": "._states",
}


__getattr__ = mb.lazy_exports(__name__, _LAZY)


if TYPE_CHECKING:  # pragma: no cover
    from ._backend import SlurmBackend
    from ._script import ArrayPart, BatchJob, render_script, sbatch_quote
    from ._states import STATES
