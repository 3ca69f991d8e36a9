"""A 2-run sweep on a local Ray instance: same runs, same database, same numbers as the local workers."""

from __future__ import annotations

import pytest
import torch
import yaml

from dgprune.experiments.store import Store
from dgprune.experiments.sweep import load_sweep, run_sweep

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'ray>=2.40' to run this test")

SWEEP = {
    "base": {
        "data": {"name": "rotated_digits"},
        "model": {"name": "mnist_cnn"},
        "pretrain": {"steps": 6, "batch_size": 16, "eval_every": 3},
        "prune": {"steps": 12, "interval": 2, "batch_size": 16, "eval_every": 4},
        "device": "cpu",
    },
    "grid": {"target": "0", "seed": 0, "prune.criterion": ["taylor", "ior"], "prune.keep_ratio": 0.5},
    "sweep": {"workers": 1, "threads": 1},
}
COMPARED = ("intra_acc", "cross_acc", "per_domain_acc", "filters_kept", "params", "macs", "selected_step")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_run_sweep_on_local_ray_matches_local_workers(tmp_path, local_ray):
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    on_ray = load_sweep(config, tmp_path / "ray")
    outcome = run_sweep(on_ray, ray_address="auto", quiet=True)  # "auto": the Ray this test started
    assert outcome.counts == {"pending": 0, "running": 0, "done": 3, "failed": 0}  # 2 pruned + 1 dense
    threads = torch.get_num_threads()
    try:
        local = run_sweep(load_sweep(config, tmp_path / "local"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert local.counts["done"] == 3
    with Store(on_ray.db_path) as a, Store(tmp_path / "local" / "results.sqlite") as b:
        ray_rows = {r["run_id"]: r for r in a.rows()}
        local_rows = {r["run_id"]: r for r in b.rows()}
        assert {u["worker"] for u in a.units()} == {"ray"}
    assert set(ray_rows) == set(local_rows) == set(on_ray.run_ids())
    for run_id, row in ray_rows.items():
        assert {k: row[k] for k in COMPARED} == {k: local_rows[run_id][k] for k in COMPARED}
