"""Data-parallel fits (bayes_sws.distributed): two gloo processes end where one process does.

The global batch is the same (25 examples: each step's shares are 13 + 12, and the
last step's 5 + 5), so the processes' summed, weighted gradients equal the single
process's gradient up to float32 round-off in the order of summation. Tolerance:
1e-5 relative (plus 1e-6 absolute) on every fitted value and per-epoch loss after
3 epochs of Adam.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from bayes_sws.distributed import DataParallel
from bayes_sws.fitting import fit, library_scope, start_fit
from bayes_sws.inference import fit_map
from bayes_sws.prior import Hyperpriors, SoftWeightSharingPrior
from tests.test_inference import FAST_RATES, toy_dataset, toy_model

BATCH = 25
EPOCHS = 3
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def train(method: str) -> dict:
    """A small MAP (with EM updates) or VI (AutoNormal, Trace_ELBO) fit; its losses and fitted values."""
    data = toy_dataset(n_train=60)
    if method == "map":
        state = fit_map(toy_model(), data, epochs=EPOCHS, batch_size=BATCH, learning_rates=FAST_RATES, em_every=2,
                        seed=3, progress=False)
        values = state.values
    else:
        prior = SoftWeightSharingPrior(n_components=3, init_means=(-0.5, 0.5), hyperpriors=Hyperpriors(
            dirichlet=2.0, means_scale=1.0, precision_gamma=(2.0, 0.1)))
        model = toy_model(prior)
        with library_scope():
            guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_values()), init_scale=0.01)
        state = start_fit(model, guide, data, loss=Trace_ELBO().differentiable_loss, batch_size=BATCH, seed=3,
                          learning_rates=FAST_RATES)
        fit(state, data, epochs=EPOCHS, progress=False)
        values = {name: value.detach().clone() for name, value in guide.state_dict().items()}
    return {"loss": [record["loss"] for record in state.history], "values": values,
            "sharded": state.reduction is not None}


METHODS = ("map", "vi")


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for method in METHODS:  # one spawn for both: starting processes is most of the cost
            torch.save(train(method), f"{out}.{method}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_fit_map_and_vi_as_one_process_does_with_the_same_global_batch(tmp_path):
    started = time.perf_counter()
    single = {method: train(method) for method in METHODS}
    single_seconds = time.perf_counter() - started
    out = str(tmp_path / "result")
    started = time.perf_counter()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    print(f"map and vi: one process {single_seconds:.1f} s, two processes {time.perf_counter() - started:.1f} s "
          "(spawn and imports included)")
    for method in METHODS:
        results = [torch.load(f"{out}.{method}.{rank}", weights_only=True) for rank in range(2)]
        assert not single[method]["sharded"] and all(result["sharded"] for result in results)
        for result in results:  # both ranks hold the same model
            torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(single[method]["loss"]),
                                       **TOLERANCE)
            assert set(result["values"]) == set(single[method]["values"])
            for name, value in single[method]["values"].items():
                torch.testing.assert_close(result["values"][name], value, **TOLERANCE, msg=f"{method} {name}")


def test_the_shards_of_a_global_batch_cover_it_once_and_the_weights_sum_to_one():
    index = torch.randperm(25)
    shards = [DataParallel(rank=r, world_size=3).shard(index) for r in range(3)]
    assert [len(s) for s in shards] == [9, 8, 8]
    assert torch.equal(torch.cat(shards), index)
    assert sum(len(s) / len(index) for s in shards) == pytest.approx(1.0)
