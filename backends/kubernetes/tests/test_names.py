"""Names, labels and $(VAR) escaping hold for any text (property tests)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshrun_kubernetes._names import (
    DNS1123_LABEL,
    LABEL_VALUE,
    cpu_quantity,
    dns1123_label,
    escape_expansion,
    expand,
    label_value,
    memory_quantity,
    parse_quantity,
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(text)
def test_any_text_becomes_a_valid_dns_label(s):
    name = dns1123_label(s, 48)
    assert DNS1123_LABEL.match(name) and len(name) <= 48
    assert dns1123_label(s, 48) == name  # deterministic


@settings(max_examples=300, deadline=None)
@given(text)
def test_any_text_becomes_a_valid_label_value(s):
    v = label_value(s)
    assert LABEL_VALUE.match(v) and len(v) <= 63


def test_different_texts_do_not_collapse():
    assert dns1123_label("Train Job") != dns1123_label("train-job!")
    assert dns1123_label("meshrun-0a1b2c3d4e5f") == "meshrun-0a1b2c3d4e5f"  # valid names are kept
    assert label_value("résumé") != label_value("resume") and label_value("resume") == "resume"


@settings(max_examples=300, deadline=None)
@given(text, st.dictionaries(st.from_regex(r"[A-Z_]{1,8}", fullmatch=True), text, max_size=4))
def test_escaped_text_survives_kubelet_expansion(s, env):
    assert expand(escape_expansion(s), env) == s


def test_expansion_port_follows_the_documented_rules():
    env = {"A": "x"}
    assert expand("$(A)", env) == "x"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("$(B)", env) == "$(B)"
    assert expand("$(A", env) == "$(A"
    assert expand("a$", env) == "a$"
    assert expand("$b", env) == "$b"


def test_quantities():
    assert parse_quantity("500m") == 0.5 and parse_quantity("16Gi") == 16 * 2**30 and parse_quantity(8) == 8
    assert parse_quantity("2113474880Ki") == 2113474880 * 1024 and parse_quantity("1e3") == 1000
    assert cpu_quantity(0.5) == "500m" and cpu_quantity(4) == "4"
    assert memory_quantity(16 * 2**30) == "16Gi" and memory_quantity(1500 * 2**20) == "1500Mi"
    assert memory_quantity(1000) == "1000"
    for bad in ("lots", "1e3Mi", "", True):
        try:
            parse_quantity(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_importing_the_backend_does_not_import_the_kubernetes_client():
    import subprocess
    import sys

    code = ("import sys, meshrun, meshrun_kubernetes; b = meshrun_kubernetes.KubernetesBackend({}); "
            "print('kubernetes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
