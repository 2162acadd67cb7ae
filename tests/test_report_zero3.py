"""Report generation under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) with uneven batches: rank 0 holds
two studies whose reports end at once, rank 1 one study that runs to the maximum length. Every rank
must run the same number of decoder steps (else the parameter all-gathers of the longer rank wait
for ever) and generate what the unpartitioned model generates."""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks
from test_report_model import tiny_generator

from xray_pretrain.models.report import GenerationOptions

pytestmark = pytest.mark.slow
MAX_STEPS = 9  # tiny_generator's max_length 10 minus <bos>


def study_images(rank: int) -> torch.Tensor:
    images = torch.randn(3, 2, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    return images[[0, 2]] if rank == 0 else images[[1]]


def reference(rank: int) -> tuple[list, int]:
    """(generated ids, decoder steps) of the plain model alone."""
    steps = []
    options = GenerationOptions(all_finished=lambda done: steps.append(done) or done)
    ids = tiny_generator(num_views=2, feature_grid=(2, 2)).eval()(study_images(rank), generation=options)
    return ids.tolist(), len(steps)


def _generate_under_zero3(rank: int) -> tuple[list, int]:
    import deepspeed

    from xray_pretrain.collectives import all_ranks_true

    model = tiny_generator(num_views=2, feature_grid=(2, 2))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.eval()
    steps = []
    counted = engine.module.head.register_forward_hook(lambda *_: steps.append(1))
    options = GenerationOptions(all_finished=lambda done: all_ranks_true(done, torch.device("cpu")))
    with torch.no_grad():
        ids = engine(study_images(rank), generation=options)
    counted.remove()
    return ids.tolist(), len(steps)


def test_zero3_generation_with_uneven_batches_finishes_on_every_rank(one_cpu_thread):
    alone = [reference(rank) for rank in range(2)]
    assert alone[0][1] < alone[1][1] == MAX_STEPS  # rank 0 alone would stop early: uneven for real
    results = run_ranks(_generate_under_zero3, start_method="spawn")
    for rank in range(2):
        ids, num_steps = results[rank]
        assert num_steps == MAX_STEPS  # the same decoder steps on both ranks
        # What the plain model generates, then <pad> (0) for the steps rank 1 still needed.
        assert ids == [row + [0] * (MAX_STEPS - len(row)) for row in alone[rank][0]]
