"""Pure pieces of the SSH backend: settings, host resolution, exclude patterns, the size guard, quoting."""

from __future__ import annotations

import shlex
import subprocess

import meshrun
import pytest

from meshrun_ssh._conn import shell_command
from meshrun_ssh._settings import DEFAULT_EXCLUDE, load_settings, resolve
from meshrun_ssh._sync import Patterns, scan


def test_settings_from_env_strings_and_errors_naming_the_field(tmp_path):
    s = load_settings({"hosts": "gpu1, gpu2 gpu3", "sync_exclude": '["data/", "*.ckpt"]', "max_sync_bytes": "1GiB",
                       "persistent": "0"})
    assert s.hosts == ["gpu1", "gpu2", "gpu3"] and s.sync_exclude == ["data/", "*.ckpt"]
    assert s.max_sync_bytes == 1024**3 and s.persistent is False
    for table, field in [({"hosts": ["a", "a"]}, "hosts"),
                         ({"hosts": [{"name": "x", "lease_dir": "rel"}]}, "lease_dir"),
                         ({"remote_dir": "rel/dir"}, "remote_dir"), ({"hosts": ["bad name!"]}, "hosts"),
                         ({"max_sync_bytes": "lots"}, "max_sync_bytes"), ({"retries": 0}, "retries")]:
        with pytest.raises(meshrun.ConfigError) as ei:
            load_settings(table)
        assert field in str(ei.value), (table, str(ei.value))


def test_old_setting_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning) as got:
        s = load_settings({"exclude": ["data/"], "remote_root": "~/x", "hosts": [{"name": "a", "remote_root": "/r"}]})
    assert any("'exclude' of SSHSettings is now called 'sync_exclude'" in str(w.message) for w in got)
    assert s.sync_exclude == ["data/"] and s.remote_dir == "~/x" and s.hosts[0].remote_dir == "/r"
    with pytest.warns(DeprecationWarning), pytest.raises(meshrun.ConfigError, match="set only 'remote_dir'"):
        load_settings({"remote_root": "~/x", "remote_dir": "~/y"})


def test_job_options_are_a_declared_model_naming_backend_field_and_choices():
    from meshrun_ssh._settings import SSHOptions

    o = SSHOptions.load("ssh", {"sync": True, "sync_exclude": ["*.ckpt"], "workdir": "/w"})
    assert (o.sync, o.sync_exclude, o.workdir, o.host) == (True, ["*.ckpt"], "/w", None)
    for opts, field, words in [({"nope": 1}, "backend_options.ssh.nope", "valid options are: host, sync"),
                               ({"sync": "yes"}, "backend_options.ssh.sync", "ssh backend"),
                               ({"sync_exclude": "data/"}, "backend_options.ssh.sync_exclude", "list"),
                               ({"workdir": ""}, "backend_options.ssh.workdir", "at least 1")]:
        with pytest.raises(meshrun.SpecError) as ei:
            SSHOptions.load("ssh", opts)
        assert ei.value.field == field and words in ei.value.message, (opts, ei.value)
    with pytest.warns(DeprecationWarning):
        assert SSHOptions.load("ssh", {"exclude": ["a"]}).sync_exclude == ["a"]


def test_hosts_resolve_through_ssh_config(tmp_path, monkeypatch):
    key = tmp_path / "id"
    key.write_text("not really a key")
    cfg = tmp_path / "config"
    cfg.write_text(f"Host gpu*\n  User alice\n  IdentityFile {key}\nHost gpu1\n  HostName 10.1.2.3\n  Port 2201\n"
                   "  ProxyJump bastion\n  UserKnownHostsFile ~/extra_known\n")
    s = load_settings({"hosts": ["gpu1", {"name": "big", "host": "gpu9", "user": "bob", "port": 22,
                                          "env": {"A": "1"}, "lease_dir": "/var/tmp/l"}],
                       "ssh_config": str(cfg), "known_hosts": str(tmp_path / "kh")})
    p = resolve(s.hosts[0], s)
    assert (p.hostname, p.port, p.user, p.keys, p.proxy_jump) == ("10.1.2.3", 2201, "alice", (str(key),), "bastion")
    assert p.known_hosts[0] == str(tmp_path / "kh") and p.known_hosts[1].endswith("/extra_known")
    q = resolve(s.hosts[1], s)
    assert (q.name, q.hostname, q.port, q.user) == ("big", "gpu9", 22, "bob")
    assert q.remote_env() == {"A": "1", "MESHRUN_LEASE_DIR": "/var/tmp/l"}
    assert "not really" not in repr(q)


@pytest.mark.parametrize("rel,name,is_dir,excluded", [
    (".git", ".git", True, True), ("src/__pycache__", "__pycache__", True, True), ("a/b.pyc", "b.pyc", False, True),
    ("data", "data", True, True), ("src/data", "data", True, True), ("data", "data", False, False),
    ("runs/x.ckpt", "x.ckpt", False, True), ("logs/2024/out.txt", "out.txt", False, True),
    ("src/train.py", "train.py", False, False),
])
def test_exclude_patterns(rel, name, is_dir, excluded):
    pats = Patterns(list(DEFAULT_EXCLUDE) + ["data/", "*.ckpt", "logs/*"])
    assert pats.excluded(rel, name, is_dir) is excluded


def test_scan_guard_and_extra_files(tmp_path):
    tmp_path = tmp_path / "proj"
    tmp_path.mkdir()
    (tmp_path / "a.py").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    (tmp_path / "big.bin").write_bytes(b"\0" * 5000)
    other = tmp_path.parent / f"{tmp_path.name}-extra.txt"
    other.write_text("extra")
    got = scan(str(tmp_path), list(DEFAULT_EXCLUDE), max_bytes=10_000, max_files=10,
               extra={"cfg/extra.txt": str(other)})
    assert [e.path for e in got] == ["a.py", "big.bin", "cfg/extra.txt"]
    with pytest.raises(meshrun.SpecError) as ei:
        scan(str(tmp_path), list(DEFAULT_EXCLUDE), max_bytes=1000, max_files=10)
    assert ei.value.field == "workdir" and "big.bin" in str(ei.value) and "max_sync_bytes" in str(ei.value)
    with pytest.raises(meshrun.SpecError) as ei:
        scan(str(tmp_path), [], max_bytes=10_000, max_files=10, extra={"/etc/x": str(other)})
    assert ei.value.field == "files./etc/x"


def test_shell_command_survives_a_real_shell():
    words = ["printf", "%s\\n", "a'b", '"c"', "$(id)", "`x`", ";&|", "new\nline", "ü ✓", "", "~", "*"]
    line = shell_command(["python3", "-c", "import os; print(repr(os.environ['V']))"], {"V": "$HOME'x\n;`id`"})
    assert shlex.split(line)[0] == "env"
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True).stdout
    assert out.strip() == repr("$HOME'x\n;`id`")
    argv = ["python3", "-c", "import sys; print(repr(sys.argv[1:]))"] + words
    p = subprocess.run(["bash", "-c", shell_command(argv)], capture_output=True, text=True)
    assert p.stdout.strip() == repr(words)
    with pytest.raises(ValueError):
        shell_command(["a\x00b"])
