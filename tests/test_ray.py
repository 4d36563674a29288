"""Extraction on Ray, on loopback: a local instance, and a two-node `ray start` cluster with a worker killed mid-build.

The distributed builds must equal the local one: same rows in every split, embeddings within
float tolerance. Skipped, with the reason, when Ray is not installed (pip install 'geoindex[ray]').
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from geoindex import build_index
from geoindex.errors import GeoindexError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'geoindex[ray]'): distributed builds untested")

from geoindex.engines import get_engine  # noqa: E402
from geoindex.engines.ray import RayEngine  # noqa: E402

FAST = dict(backbone="resnet18", weights="none", image_size=64, batch_size=8, num_workers=0, progress=False)
ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")


def read_embeddings(index_path: Path) -> dict:
    with h5py.File(index_path / "embeddings.h5") as f:
        return {split: (list(f[split]["path"].asstr()[:]), f[split]["embeddings"][:].astype(np.float32))
                for split in ("train", "val", "test")}


def assert_same_build(a: Path, b: Path):
    ea, eb = read_embeddings(a), read_embeddings(b)
    for split in ea:
        assert ea[split][0] == eb[split][0], f"{split}: different rows"
        np.testing.assert_allclose(ea[split][1], eb[split][1], atol=3e-3)  # float16 storage, other thread counts
    assert (a / "faiss.index").stat().st_size == (b / "faiss.index").stat().st_size


@pytest.fixture(scope="module")
def local_build(gsv_tree, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("local")
    return build_index(gsv_tree, name="local", index_dir=index_dir, log=lambda m: None, **FAST).path


def test_ray_build_on_a_local_instance_resumes_and_equals_the_local_build(gsv_tree, local_build, tmp_path):
    def interrupt_after_three(shards_done):
        if shards_done == 3:
            raise KeyboardInterrupt  # the driver stops (Ctrl-C) with shards still running on Ray

    temp_dir = tempfile.mkdtemp(prefix="gi-ray-")  # not /tmp/ray: leave other Ray sessions alone
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", _temp_dir=temp_dir)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(gsv_tree, name="ray", index_dir=tmp_path, engine=RayEngine(max_shard_rows=8),
                        checkpoint_rows=8, on_batch=interrupt_after_three, log=lambda m: None, **FAST)
        assert len(list((tmp_path / ".staging" / "ray" / "cache").glob("shard-*.npz"))) == 3  # finished shards kept
        shards = []
        report = build_index(gsv_tree, name="ray", index_dir=tmp_path, engine=RayEngine(max_shard_rows=8),
                             checkpoint_rows=8, on_batch=shards.append, log=lambda m: None, **FAST)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert report.resumed_rows == 24 and report.extracted_rows == 40  # only the other shards were redone
    assert shards[-1] == len(shards) >= 5  # the 40 other rows, in shards of at most 8
    assert_same_build(local_build, report.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 plus a second node joining it, each with one CPU; both stopped after."""
    if not RAY_CLI.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    logs = tmp_path_factory.mktemp("ray-logs")
    # Its own temp dir (short: Unix socket paths are limited), so /tmp/ray and other sessions are left alone.
    temp_dir = tempfile.mkdtemp(prefix="gi-ray-")
    nodes = [subprocess.Popen([str(RAY_CLI), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--include-dashboard", "false", "--temp-dir", temp_dir, *common], env=env,
                              stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 60
        joined = False
        while time.monotonic() < deadline and not joined:
            time.sleep(1)
            if len(nodes) == 1 and "Ray runtime started" in (logs / "head.log").read_text():
                nodes.append(subprocess.Popen([str(RAY_CLI), "start", "--address", address, "--node-ip-address",
                                               "127.0.0.1", *common], env=env,
                                              stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
            joined = len(nodes) == 2 and "Ray runtime started" in (logs / "worker.log").read_text()
            assert all(n.poll() is None for n in nodes), (logs / "head.log").read_text()[-2000:]
        assert joined, "the Ray cluster did not start within 60 s"
        yield address, env
    finally:
        for node in reversed(nodes):  # SIGTERM: `ray start --block` stops its node's processes on exit
            node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_build_survives_a_killed_worker(two_node_cluster, gsv_tree, local_build, tmp_path):
    address, env = two_node_cluster
    marker = tmp_path / "killed"
    # The build runs as its own driver process; the first worker to start the shard holding row 20
    # SIGKILLs itself, once (a marker file remembers), so Ray must rerun that shard elsewhere.
    script = textwrap.dedent(f"""
        import os, signal, ray
        from pathlib import Path
        from geoindex import build_index
        from geoindex.engines.ray import RayEngine

        def kill_once(rows):
            marker = Path({str(marker)!r})
            if 20 in rows and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        ray.init(address={address!r}, logging_level="warning")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, ray.nodes()
        report = build_index({str(gsv_tree)!r}, name="cluster", index_dir={str(tmp_path)!r},
                             engine=RayEngine(max_shard_rows=8, on_shard_start=kill_once), checkpoint_rows=8,
                             log=lambda m: None, **{FAST!r})
        print("ROWS", report.extracted_rows)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "no worker was killed"
    killed_pid = int(marker.read_text())
    assert not Path(f"/proc/{killed_pid}").exists() or "zombie" in Path(f"/proc/{killed_pid}/status").read_text()
    assert "ROWS 64" in proc.stdout
    assert_same_build(local_build, tmp_path / "cluster")


def test_cli_build_on_the_cluster_equals_the_local_build(two_node_cluster, gsv_tree, local_build, tmp_path):
    address, env = two_node_cluster
    proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "build", "--data", str(gsv_tree), "--backbone",
                           "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "8", "--workers",
                           "0", "--name", "cli", "--index-dir", str(tmp_path), "--engine", "ray", "--ray-address",
                           address], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_build(local_build, tmp_path / "cli")


def test_ray_address_without_ray_engine_is_one_clear_error(gsv_tree, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "build", "--data", str(gsv_tree), "--weights", "none",
                           "--index-dir", str(tmp_path), "--ray-address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "--ray-address only applies to --engine ray" in proc.stderr and "Traceback" not in proc.stderr


def test_get_engine_names(tmp_path):
    assert get_engine("local").name == "local" and get_engine("ray").name == "ray"
    with pytest.raises(GeoindexError, match="unknown engine"):
        get_engine("spark")
