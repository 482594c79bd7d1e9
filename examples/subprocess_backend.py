"""A complete meshrun backend, small enough to read in one sitting: each job runs on this machine under the
host agent, started as a detached process. It passes meshrun's conformance suite
(tests/test_conformance_example.py), and docs/writing-a-backend.md explains each part.

Use it without packaging it::

    import meshrun, meshrun.backend as mb
    from subprocess_backend import SubprocessBackend

    mb.register_backend("subprocess", SubprocessBackend)
    meshrun.configure({"backends": {"subprocess": {"grace_period": 2}}})
    print(meshrun.submit(meshrun.JobSpec(command=["hostname"], backend="subprocess")).result())

A real backend is a distribution with an entry point instead (docs/writing-a-backend.md, "Layout"). Run the
conformance suite against it (what the test suite does)::

    python -m pytest -q tests/test_conformance_example.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Iterator, Optional, Sequence

from pydantic import Field

import meshrun.backend as mb


class SubprocessSettings(mb.BackendSettings):
    """``[backends.subprocess]``: validated by the core when the backend is created."""

    python: str = Field(sys.executable, min_length=1)  # the interpreter that runs the host agent
    grace_period: float = Field(10.0, ge=0)  # seconds between SIGTERM and SIGKILL on cancel and timeout


class SubprocessOptions(mb.BackendOptions):
    """``backend_options["subprocess"]`` of one job: validated by the core before placement."""

    nice: int = Field(0, ge=0, le=19)  # run the job at this niceness


class SubprocessBackend(mb.Backend):
    name = "subprocess"
    features = mb.Feature.COMMANDS | mb.Feature.FUNCTIONS | mb.Feature.GPUS | mb.Feature.LOGS_FOLLOW
    install_hint = "examples/subprocess_backend.py (register it with meshrun.backend.register_backend)"
    poll_interval = (0.02, 1.0)
    shared_filesystem = True  # the job sees the submitter's files: nothing to stage, nothing to fetch
    settings_model = SubprocessSettings
    options_model = SubprocessOptions

    def check(self) -> mb.Availability:
        return mb.Availability(True)

    def offers(self, spec: Any) -> list[mb.Offer]:
        offer = mb.Offer(backend=self.name, where="localhost", gpus=spec.resources.gpus,
                         gpu_type=spec.resources.gpu_type)
        if spec.resources.nodes > 1:
            return [offer.rejected("one machine: single-node jobs only")]
        return [offer]

    def _agent(self, *args: str, nice: int = 0) -> Any:
        argv = ["nice", "-n", str(nice)] if nice else []
        p = subprocess.run([*argv, self.settings.python, str(mb.agent_file()), *args], capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise mb.BackendError(f"the host agent failed: {p.stderr.strip()}", backend=self.name,
                                  argv=[*argv, "_agent.py", *args], returncode=p.returncode, stderr=p.stderr)
        return json.loads(p.stdout)

    def submit(self, submission: mb.Submission, offer: Optional[mb.Offer] = None) -> str:
        opts: SubprocessOptions = self.options(submission.spec)
        launch = dict(submission.launch, grace_period=self.settings.grace_period)
        (submission.job_dir / "launch.json").write_text(json.dumps(launch))
        self._agent("submit", str(submission.job_dir), nice=opts.nice)
        return submission.job_id  # the backend id; status, cancel and logs get it with the job's folder

    def status(self, refs: Sequence[mb.JobRef]) -> dict[str, mb.JobStatus]:
        if not refs:
            return {}
        records = self._agent("status", *(str(r.job_dir) for r in refs))  # one agent call for every job
        return {r: mb.map_agent_status(records.get(str(r.job_dir)) or {}) for r in refs}

    def cancel(self, ref: mb.JobRef) -> None:
        self._agent("cancel", str(ref.job_dir))  # a job that already ended is left as it is

    def logs(self, ref: mb.JobRef, *, follow: bool = False) -> Iterator[str]:
        job_dir = ref.job_dir
        return mb.tail_file(job_dir / "output.log", follow=follow, done=lambda: (job_dir / "exit.json").exists())
