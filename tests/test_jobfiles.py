"""Real job files (tests/data/jobfiles, see its README for where each comes from): what meshrun makes of each,
through the same checks scripts/import_corpus.py runs over whole checkouts. SkyPilot's own parse and the
comparison with it run in backends/skypilot/tests/test_jobfiles.py; the #SBATCH headers in
backends/slurm/tests/test_options.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshrun.testing import load_script

DATA = Path(__file__).resolve().parent / "data" / "jobfiles"


def corpus_script():
    return load_script("import_corpus.py")


# file -> (meshrun's verdict, the GPU request of each task, the alternatives of the first)
EXPECTED = {
    "skypilot/aws-neuron-multi-accelerator.yaml": ("imported", ["A100:1"], ["A100:1", "Inferentia:6"]),
    "skypilot/chain_dag-2_jobs.yaml": ("imported", [None, None], []),
    "skypilot/custom_image.yaml": ("imported", ["V100:1"], []),
    "skypilot/deepseek-r1-671B-A100.yaml": ("imported", ["A100-80GB:8"], []),
    "skypilot/deepspeed-multinode.yaml": ("imported", ["A100:1"], []),
    "skypilot/disk_size.yaml": ("imported", [None], []),
    "skypilot/distributed-pytorch-train.yaml": ("imported", ["L4:1"], []),
    "skypilot/docs-any-of.yaml": ("imported", ["A10G:1"], ["A10G:1", "L4:1"]),
    "skypilot/docs-env-in-paths.yaml": ("imported", ["L4:1"], ["L4:1", "A10G:1", "A100:1"]),
    "skypilot/docs-fractional-gpu.yaml": ("imported", ["T4:1"], []),
    "skypilot/docs-gpus-alias-flow-mapping.yaml": ("imported", ["A10:1"], []),
    "skypilot/docs-ordered.yaml": ("imported", ["H100:8"], ["H100:8", "A100-80GB:8"]),
    "skypilot/docs-secrets.yaml": ("imported", [None], []),
    "skypilot/gemma-serve.yaml": ("imported", ["L4:1"], ["L4:1", "A10g:1", "A10:1", "L40:1", "A40:1", "A100:1",
                                                         "A100-80GB:1"]),
    "skypilot/gpt2-pipeline.yaml": ("imported", [None, "A100:1"], []),
    "skypilot/kimi-k2.yaml": ("imported", ["H100:8"], []),
    "skypilot/llama-2-chatbot-hf.yaml": ("imported", ["A100:1"], []),
    "skypilot/llama3.yaml": ("imported", ["L4:8"], ["L4:8", "A10g:8", "A10:8", "A100:4", "A100:8", "A100-80GB:2",
                                                   "A100-80GB:4", "A100-80GB:8"]),
    "dstack/distributed-training-torchrun.dstack.yml": ("refused: resources.gpu", None, None),  # gpu: 1..8
    "dstack/llms-deepseek-trl-amd-deepseek_v2.dstack.yml": ("refused: resources.gpu", None, None),  # MI300X
    "dstack/llms-deepseek-trl-amd-grpo.dstack.yml": ("refused: resources.gpu", None, None),
    "dstack/llms-deepseek-trl-amd.dstack.yml": ("refused: resources.gpu", None, None),
    "dstack/llms-deepseek-trl-nvidia-deepseek_v2.dstack.yml": ("refused: nvcc", None, None),
    "dstack/llms-deepseek-trl-nvidia.dstack.yml": ("imported", ["1"], None),  # gpu: 24GB
    "dstack/misc-airflow-dags-dstack-repo-task.dstack.yml": ("imported", [None], None),
    "dstack/misc-http.server-task.dstack.yml": ("refused: ports", None, None),
    "dstack/misc-jupyterlab.dstack.yml": ("refused: ports", None, None),
    "dstack/misc-ray-cluster.dstack.yaml": ("refused: ports", None, None),
    "dstack/misc-spark-cluster.dstack.yaml": ("refused: ports", None, None),
    "dstack/misc-spark-task.dstack.yaml": ("imported", [None], None),
    "dstack/misc-streamlit-task.dstack.yml": ("refused: ports", None, None),
    "dstack/single-node-training-axolotl-amd-build-xformers.dstack.yml": ("refused: resources.gpu", None, None),
    "dstack/single-node-training-axolotl-amd.dstack.yml": ("refused: resources.gpu", None, None),
    "dstack/single-node-training-optimum-tpu-llama31.dstack.yml": ("refused: resources.gpu", None, None),  # TPU
    "dstack/single-node-training-qlora.dstack.yml": ("refused: ports", None, None),
    "dstack/single-node-training-trl-amd.dstack.yml": ("refused: resources.gpu", None, None),
}


def test_every_vendored_job_file_is_listed():
    files = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_what_meshrun_makes_of_each_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = corpus_script().check_file(DATA / name, sky=False)
    verdict, gpus, alts = EXPECTED[name]
    assert r is not None and r["meshrun"] == verdict, r
    assert not r.get("gpus_lost")
    if verdict == "imported":
        assert r["gpus"] == gpus
        if alts is not None:
            assert r["gpu_alternatives"][0] == alts
    else:
        assert r["reason"].startswith(verdict.split(": ")[1])  # the error names the field


def test_the_corpus_script_counts(capsys):
    assert corpus_script().main([str(DATA / "dstack"), "--no-compare"]) == 0
    out = capsys.readouterr().out
    assert '"dstack_tasks": 18' in out and '"gpus_lost": 0' in out


@pytest.mark.parametrize("text,what", [
    ("pool:\n  workers: 2\nresources:\n  accelerators: L4\nsetup: pip install x\n",
     "SkyPilot spec without run (a pool, a service or a cluster's set-up)"),
    ("resources:\n  cpus: 2+\nsetup: pip install x\nconfig:\n  kubernetes: {}\n",
     "SkyPilot spec without run (a pool, a service or a cluster's set-up)"),
    ("file_mounts:\n  /code:\n    name: b\n    mode: MOUNT\n", "SkyPilot task fragment without run"),
    ("api_server:\n  endpoint: http://x\njobs:\n  controller:\n    resources: {cpus: 2}\n", "SkyPilot config"),
    ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n", "Kubernetes manifest"),
    ("name: ckpt\ntype: k8s-pvc\ninfra: k8s\nsize: 100Gi\n", "SkyPilot volume spec"),
    ("base_model: m\nlora_r: 8\n", "other YAML (another tool's config)"),
    ("run: [unclosed\n", "not YAML"),
])
def test_the_corpus_script_counts_what_is_not_a_task(text, what, tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text(text)
    r = corpus_script().check_file(f, sky=False)
    assert r["kind"] == "not a task" and r["what"] == what and r["meshrun"] == "not a task"
    counts = corpus_script().summarize([r])
    assert counts["yaml_files_read"] == 1 and counts["not_a_task"] == {what: 1} and counts["skypilot_files"] == 0
