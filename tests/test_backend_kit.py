"""``meshrun.backend``: the backend-author kit in its own documented module; ``meshrun``'s ``__all__`` is the user
API, and every kit name still resolves at the top level as before."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import meshrun
import meshrun.backend as mb

REPO = Path(__file__).resolve().parent.parent

KIT_ONLY = {"Backend", "BackendSettings", "Availability", "Feature", "JobStatus", "Submission", "RESULT_FILES",
            "STAGED_FILES", "register_backend", "unregister_backend", "agent_file", "agent_version",
            "map_agent_status", "tail_file", "place_files_locally", "dist_env", "free_port", "DIST_ENV_VARS",
            "slurm_time"}


def test_every_kit_name_resolves_and_is_the_same_object_at_the_top_level():
    assert set(mb.__all__) >= KIT_ONLY
    for name in mb.__all__:
        value = getattr(mb, name)
        assert value is not None, name
    for name in KIT_ONLY:  # no breaking change: meshrun.Backend and friends still work
        assert getattr(meshrun, name) is getattr(mb, name), name
    assert mb.DIST_ENV_VARS[0] == "MASTER_ADDR"
    assert meshrun.backend is mb


def test_the_top_level_all_is_the_user_api():
    assert not KIT_ONLY & set(meshrun.__all__)
    for name in ("job", "Job", "JobSpec", "run", "submit", "gather", "wait", "JobState", "SpecError",
                 "JobFailed", "plan", "offers", "format_size"):
        assert name in meshrun.__all__, name
    for name in meshrun.__all__:
        getattr(meshrun, name)


def test_an_unknown_name_is_an_attribute_error_naming_the_module():
    for mod, label in ((meshrun, "meshrun"), (mb, "meshrun.backend")):
        try:
            getattr(mod, "no_such_name")
        except AttributeError as e:
            assert f"module '{label}' has no attribute 'no_such_name'" in str(e)
        else:
            raise AssertionError(f"{label}.no_such_name resolved")


def test_importing_the_kit_is_cheap():
    # the kit's modules load on first use: importing it (as every backend package does) loads no agent,
    # scheduler or pydantic model
    code = ("import sys, meshrun.backend; "
            "print(sorted(m for m in sys.modules if m.startswith(('meshrun.', 'pydantic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['meshrun._version', 'meshrun.backend']", out


def test_the_backends_import_the_kit_from_meshrun_backend():
    # the in-tree backends use the kit's module for the kit's names (meshrun.<user API> for the rest)
    kit = "|".join(sorted(KIT_ONLY - {"dist_env", "free_port", "DIST_ENV_VARS"}))
    stale = []
    for path in sorted(REPO.glob("backends/*/meshrun_*/*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(rf"\bmeshrun\.({kit})\b", line):
                stale.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not stale, "\n".join(stale)


def test_writing_a_backend_documents_the_kit_module():
    doc = (REPO / "docs" / "writing-a-backend.md").read_text()
    assert "import meshrun.backend as mb" in doc
    assert "class MyBackend(mb.Backend):" in doc


def test_a_job_ref_is_the_backend_id_carrying_the_job_folder(tmp_path):
    import pickle

    ref = mb.JobRef("123_4", "0a1b2c", tmp_path)
    assert ref == "123_4" and {ref: 1}["123_4"] == 1 and repr(ref) == "'123_4'" and f"{ref}" == "123_4"
    assert (ref.backend_id, ref.job_id, ref.job_dir) == ("123_4", "0a1b2c", tmp_path)
    again = pickle.loads(pickle.dumps(ref))
    assert isinstance(again, mb.JobRef) and (again, again.job_id, again.job_dir) == (ref, "0a1b2c", tmp_path)
