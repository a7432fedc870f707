"""Instance claims on one host: a second server with the same instance id is refused, and an
instance counts as gone only once its process is (SIGKILL included), never while it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from critique_local.hoststate import HostState, InstanceInUse
from tests.helpers import ROOT

ID = "0123456789abcdef"
HOLDER = """
import sys, time
from pathlib import Path
from critique_local.hoststate import HostState
claim = HostState(Path(sys.argv[1])).claim(sys.argv[2], Path(sys.argv[3]))
claim.publish(networks=["net-a"])
print("claimed", flush=True)
time.sleep(600)
"""


def hold(root: Path, instance: str, data_dir: Path) -> subprocess.Popen[str]:
    """Another process that claims ``instance`` and keeps running."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), instance, str(data_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    return proc


def data_dir_of(tmp_path: Path, instance: str) -> Path:
    data = tmp_path / f"data-{instance}"
    data.mkdir()
    (data / "instance_id").write_text(instance)
    return data


def test_a_running_instance_cannot_be_claimed_twice_and_is_gone_only_when_its_process_is(tmp_path: Path) -> None:
    host = HostState(tmp_path / "host")
    data = data_dir_of(tmp_path, ID)
    other = hold(host.root, ID, data)
    try:
        with pytest.raises(InstanceInUse) as refused:
            host.claim(ID, data, wait_s=0.2)
        assert refused.value.record["pid"] == other.pid and str(data) in str(refused.value)
        assert host.alive(ID)
        [record] = host.live_records()
        assert record.networks == ("net-a",) and record.pid == other.pid and record.can_return()
        with host.if_gone(ID) as gone:
            assert gone is None
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    assert not host.alive(ID) and host.live_records() == []
    with host.if_gone(ID) as gone:  # proven gone: its record is still there for whoever cleans up
        assert gone is not None and gone.data_dir == str(data)
    claim = host.claim(ID, data)  # the same data dir starts again
    assert host.alive(ID)
    claim.release()
    assert not host.alive(ID) and host.read_record(ID).data_dir == str(data)  # the record outlives it


def test_an_instance_whose_data_dir_is_gone_can_never_come_back(tmp_path: Path) -> None:
    host = HostState(tmp_path / "host")
    data = data_dir_of(tmp_path, ID)
    host.claim(ID, data).release()
    assert host.read_record(ID).can_return()
    (data / "instance_id").write_text("fedcba9876543210")  # the data dir now belongs to another instance
    assert not host.read_record(ID).can_return()
    with host.if_gone(ID, forget=True) as gone:
        assert gone is not None
    assert ID not in host.known()


def test_a_claim_waits_for_a_cleaner_and_locks_the_file_that_stays(tmp_path: Path) -> None:
    """A server restarting while another removes what its previous life left: the restart waits,
    and ends up holding the lock file the others see (not the one the cleaner deleted)."""
    host = HostState(tmp_path / "host")
    data = data_dir_of(tmp_path, ID)
    host.claim(ID, data).release()
    claimed = threading.Event()
    with host.if_gone(ID, forget=True) as gone:
        assert gone is not None
        threading.Thread(target=lambda: (host.claim(ID, data, wait_s=30), claimed.set()), daemon=True).start()
        time.sleep(0.3)
        assert not claimed.is_set()  # waits while the cleaner holds the lock
    assert claimed.wait(10)
    assert host.alive(ID)  # the lock file at the path is held


def test_two_servers_on_a_new_data_dir_get_one_instance_id(tmp_path: Path) -> None:
    script = ("import sys; from pathlib import Path; from critique_local.app import instance_id; "
              "from critique_local.config import load_settings; "
              "print(instance_id(load_settings(environ={'CRITIQUE_LOCAL_SERVER_DATA_DIR': sys.argv[1]})))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and ids == {(tmp_path / "data" / "instance_id").read_text()}
    assert sorted(os.listdir(tmp_path / "data")) == ["instance_id"]


RECLAIM = """
import subprocess, sys
from pathlib import Path
import docker
from critique_local.hoststate import HostState
from critique_local.sandboxes import dockerhost, firewall
host, data = HostState(Path(sys.argv[1])), Path(sys.argv[2])
own, dead, foreign = sys.argv[3:6]
host.claim(dead, data).release()  # a server of this host state that stopped (its data dir stays)
for instance in (own, dead, foreign):
    subprocess.run(["iptables", "-w", "-N", firewall.chain_of(instance)], check=True)
# never connects: only instances that can never come back have containers removed, and none here can't
client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
dockerhost.reclaim(client, host, own, rules=True)
print(" ".join(sorted(firewall.instance_chains())))
"""


def test_reclaim_leaves_the_rules_of_instances_this_host_state_does_not_know(tmp_path: Path) -> None:
    """A server with another ``server.host_state_dir`` (or a non-root one, whose claims fall back
    to a per-user temp dir) may be running: its chain is not ours to remove. A gone instance of
    our own host state loses its chain. In a network namespace of its own: the host's real
    iptables (other servers' chains) are never touched."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root (a private network namespace for iptables)")
    own, dead, foreign = "1111111111111111", "2222222222222222", "3333333333333333"
    data = data_dir_of(tmp_path, dead)
    res = subprocess.run(["unshare", "--net", sys.executable, "-c", RECLAIM, str(tmp_path / "host"), str(data),
                          own, dead, foreign], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [own, foreign]
