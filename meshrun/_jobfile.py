"""A job file, whichever tool wrote it: a SkyPilot task YAML (one task or a pipeline) or a dstack task
configuration (``type: task``). ``meshrun run FILE`` reads it through here, and so do
``JobSpec.from_skypilot_yaml`` / ``from_dstack_yaml`` / ``pipeline_from_skypilot_yaml``: the readers are
registered in :data:`meshrun._spec.FILE_READERS` here, so that the spec module depends on no reader (the
readers build JobSpecs). ``meshrun.JobSpec`` is loaded through this module."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ._dstackyaml import is_dstack_config, spec_from_dstack_yaml
from ._spec import FILE_READERS, JobSpec
from ._taskyaml import load_documents, spec_from_task_yaml, specs_from_task_yaml

FILE_READERS["skypilot"] = spec_from_task_yaml
FILE_READERS["skypilot-pipeline"] = specs_from_task_yaml
FILE_READERS["dstack"] = spec_from_dstack_yaml

__all__ = ["JobSpec", "specs_from_job_file"]


def specs_from_job_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> list[Any]:
    """The jobs of the file, in order: one, or each task of a SkyPilot pipeline. ``env`` is merged over the
    file's environment and fills the variables it leaves to the submitter."""
    if is_dstack_config(load_documents(path)[0]):
        return [spec_from_dstack_yaml(path, env=env)]
    return specs_from_task_yaml(path, env=env)
