"""A job file, whichever tool wrote it: a SkyPilot task YAML (one task or a pipeline) or a dstack task
configuration (``type: task``). ``meshrun run FILE`` reads it through here, and this module registers the
readers behind ``JobSpec.from_skypilot_yaml``/``pipeline_from_skypilot_yaml``/``from_dstack_yaml`` (so that
``meshrun._spec`` imports none of them)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ._dstackyaml import is_dstack_config, spec_from_dstack_yaml
from ._spec import FILE_READERS, JobSpec  # noqa: F401  (meshrun.JobSpec is served from here, readers registered)
from ._taskyaml import load_documents, spec_from_task_yaml, specs_from_task_yaml


def specs_from_job_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> list[Any]:
    """The jobs of the file, in order: one, or each task of a SkyPilot pipeline. ``env`` is merged over the
    file's environment and fills the variables it leaves to the submitter."""
    if is_dstack_config(load_documents(path)[0]):
        return [spec_from_dstack_yaml(path, env=env)]
    return specs_from_task_yaml(path, env=env)


FILE_READERS["skypilot"] = spec_from_task_yaml
FILE_READERS["skypilot-pipeline"] = specs_from_task_yaml
FILE_READERS["dstack"] = spec_from_dstack_yaml
