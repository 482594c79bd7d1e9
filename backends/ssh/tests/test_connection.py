"""The connection layer against real OpenSSH servers: commands, files, trust, ssh_config, reuse."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import meshrun
import pytest

import meshrun_ssh
from meshrun_ssh._errors import AuthFailed, HostKeyRefused

pytestmark = pytest.mark.service

HOSTILE = [
    "it's", 'say "hi"', "$(touch /tmp/meshrun-pwned)", "`id`", "a;b && c || d", "x\ny\r\nz", "tab\there",
    "ünïcödé ✓ 日本語 🚀", "\\back\\slash\\", "-n", "--flag=$HOME", "*", "~", "", " lead and trail ", "!$#&|<>",
]


def _host_table(pool, make_config, name="host1"):
    return next(h for h in make_config()["hosts"] if h["name"] == name)


def test_run_is_byte_exact_and_never_raises_on_exit_codes(pool, make_config):
    cfg = make_config()
    conn = meshrun_ssh.connect(_host_table(pool, make_config), config=cfg)
    p = conn.run(["python3", "-c", "import json,sys; print(json.dumps(sys.argv[1:]))"] + HOSTILE)
    assert p.returncode == 0, p.stderr
    import json

    assert json.loads(p.stdout) == HOSTILE
    p = conn.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (p.returncode, p.stdout, p.stderr) == (7, "out\n", "err\n")
    data = bytes(range(256)) * 4000
    p = conn.run(["python3", "-c", "import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"],
                 input=data)
    import hashlib

    assert p.stdout.strip() == hashlib.sha256(data).hexdigest()
    p = conn.run(["python3", "-c", "import os; print(os.environ['V'])"], env={"V": HOSTILE[2] + HOSTILE[7]})
    assert p.stdout == HOSTILE[2] + HOSTILE[7] + "\n"
    with pytest.raises(subprocess.TimeoutExpired):
        conn.run(["sleep", "5"], timeout=0.5)
    assert not Path("/tmp/meshrun-pwned").exists()


def test_files_and_one_transport_for_many_channels(pool, make_config):
    cfg = make_config()
    conn = meshrun_ssh.connect(_host_table(pool, make_config), config=cfg)
    assert meshrun_ssh.connect(_host_table(pool, make_config), config=cfg) is conn  # cached per process
    transport = conn.transport()
    payload = "ünïcödé\n".encode() + bytes(range(256))
    target = "~/.meshrun-test/dir with space/it's a file.bin"
    conn.put_bytes(payload, target, 0o640)
    assert conn.exists(target) and not conn.exists("~/.meshrun-test/nope")
    assert conn.get_bytes(target) == payload
    p = conn.run(["stat", "-c", "%a", Path(target.replace("~", pool["users"]["mrssh-alice"]["home"], 1)).as_posix()])
    assert p.stdout.strip() == "640"
    # many commands at once, all multiplexed over the one transport
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(conn.run(["sh", "-c", f"sleep 0.3; echo {i}"])))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r.stdout) for r in results) == list(range(8))
    assert conn.transport() is transport
    # the signatures other backends code against, by keyword
    local = Path(pool["scratch"]) / f"put-{id(conn)}.txt"
    local.write_text("by keyword\n")
    conn.put_file(local_path=local, remote_path="~/.meshrun-test/kw.txt")
    local.unlink()
    conn.put_bytes(data=b"x", remote_path="~/.meshrun-test/kw2.txt", mode=0o600)
    assert conn.get_bytes(remote_path="~/.meshrun-test/kw.txt") == b"by keyword\n"
    assert conn.exists(remote_path="~/.meshrun-test/kw2.txt")
    # a dropped transport is replaced by itself on the next use
    gen = conn.generation
    transport.close()
    assert conn.run(["echo", "back"]).stdout == "back\n" and conn.generation == gen + 1
    conn.run(["rm", "-rf", ".meshrun-test"])


def test_unknown_host_key_is_refused_with_a_way_to_trust_it(pool, make_config, tmp_path):
    kh = tmp_path / "known_hosts"
    lines = Path(pool["known_hosts"]).read_text().splitlines()
    h3 = next(h for h in pool["hosts"] if h["name"] == "host3")
    kh.write_text("\n".join(line for line in lines if not line.startswith(h3["address"] + " ")) + "\n")
    cfg = make_config(known_hosts=str(kh))
    with pytest.raises(HostKeyRefused) as ei:
        meshrun_ssh.connect(_host_table(pool, make_config, "host3"), config=cfg)
    msg = str(ei.value)
    assert "not in known_hosts" in msg and "ssh-keyscan" in msg and "SHA256:" in msg and h3["address"] in msg
    # the backend reports it per host, as unavailable, never raising
    meshrun.configure({"backends": {"ssh": cfg}})
    offers = meshrun.get_backend("ssh").offers(meshrun.JobSpec(command=["true"]))
    by = {o.where: o for o in offers}
    assert by["host1"].fits and not by["host3"].fits and "not in known_hosts" in by["host3"].reason
    # a known host with a different key: refused as well, with its own message
    other = next(line for line in lines if line.startswith(pool["hosts"][0]["address"] + " "))
    kh.write_text(f"{h3['address']} {other.split(' ', 1)[1]}\n")
    with pytest.raises(HostKeyRefused) as ei:
        meshrun_ssh.connect(_host_table(pool, make_config, "host3"), config=make_config(known_hosts=str(kh)))
    assert "different key" in str(ei.value)
    meshrun.configure()


def test_ssh_config_aliases_and_proxy_jump(pool, tmp_path):
    """Plain host names resolve through an ssh_config (HostName, Port, User, IdentityFile), and ProxyJump
    reaches a host through another one."""
    user = pool["users"]["mrssh-alice"]
    h1, h2 = pool["hosts"][0], pool["hosts"][1]
    cfg_file = tmp_path / "ssh_config"
    cfg_file.write_text(Path(user["ssh_config"]).read_text() + f"""
Host via-jump
  HostName {h2['address']}
  Port {h2['port']}
  User mrssh-alice
  IdentityFile {user['key']}
  ProxyJump host1
""")
    cfg = {"hosts": ["host1", "via-jump"], "ssh_config": str(cfg_file), "known_hosts": pool["known_hosts"]}
    c1 = meshrun_ssh.connect("host1", config=cfg)
    assert c1.params.hostname == h1["address"] and c1.params.user == "mrssh-alice"
    assert c1.run(["hostname"]).stdout.strip() == "host1"
    c2 = meshrun_ssh.connect("via-jump", config=cfg)
    assert c2.run(["hostname"]).stdout.strip() == "host2"
    if pool["mode"] == "netns":  # the connection to host2 came from host1's address on the bridge
        assert c2.run(["sh", "-c", "echo $SSH_CONNECTION"]).stdout.split()[0] == h1["address"]


def test_bad_settings_name_the_field_and_never_show_keys(pool, make_config, tmp_path):
    with pytest.raises(meshrun.ConfigError) as ei:
        meshrun_ssh.connect("host1", config={"hosts": [{"name": "host1", "port": 70000}]})
    assert "port" in str(ei.value)
    with pytest.raises(meshrun.ConfigError) as ei:
        meshrun.configure({"backends": {"ssh": {"hosts": ["a"], "colour": "blue"}}})
        meshrun.get_backend("ssh")
    assert "colour" in str(ei.value) and "known_hosts" in str(ei.value)
    with pytest.raises(meshrun.ConfigError) as ei:
        meshrun.configure({"backends": {"ssh": {"hosts": [{"name": "h", "env": {"BAD KEY": "x"}}]}}})
        meshrun.get_backend("ssh")
    assert "hosts.0" in str(ei.value) and "env" in str(ei.value)
    meshrun.configure()
    # a key the server does not accept: a clear refusal that shows the path, never the key
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    table = dict(_host_table(pool, make_config), key=str(wrong))
    with pytest.raises(AuthFailed) as ei:
        meshrun_ssh.connect(table, config=make_config())
    secret = wrong.read_text()
    assert str(wrong) in str(ei.value) and secret.splitlines()[1] not in str(ei.value)
    missing = dict(_host_table(pool, make_config), key=str(tmp_path / "nope"))
    with pytest.raises(AuthFailed) as ei:
        meshrun_ssh.connect(missing, config=make_config())
    assert "key" in str(ei.value) and "does not exist" in str(ei.value)
