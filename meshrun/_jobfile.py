"""A job file, whichever tool wrote it: a SkyPilot task YAML (one task or a pipeline) or a dstack task
configuration (``type: task``). ``meshrun run FILE`` reads it through here."""

from __future__ import annotations

import os
from typing import Any, Mapping


def specs_from_job_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> list[Any]:
    """The jobs of the file, in order: one, or each task of a SkyPilot pipeline. ``env`` is merged over the
    file's environment and fills the variables it leaves to the submitter."""
    from ._dstackyaml import is_dstack_config, spec_from_dstack_yaml
    from ._taskyaml import load_documents, specs_from_task_yaml

    if is_dstack_config(load_documents(path)[0]):
        return [spec_from_dstack_yaml(path, env=env)]
    return specs_from_task_yaml(path, env=env)
