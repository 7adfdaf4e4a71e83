"""megatron-core's overlapped data-parallel communication (``--overlap-grad-reduce``,
``--overlap-param-gather`` with the distributed optimizer) trains exactly what the
synchronous reduction trains: DP=2, fp32, 3 steps, the overlapped run with several gradient
buckets."""
from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.layouts import LayoutRun, assert_same_training, train_layout
from megatron_normistral.training.ddp import DDPConfig

# Parameters per bucket: the tiny model then has several buckets, so reductions and gathers
# really are started bucket by bucket during the backward and forward passes.
SMALL_BUCKETS = 20_000


def _run(overlap: bool) -> LayoutRun:
    ddp = DDPConfig(overlap_grad_reduce=overlap, overlap_param_gather=overlap, bucket_size=SMALL_BUCKETS)
    return LayoutRun(parallel=ParallelConfig(use_distributed_optimizer=True), ddp=ddp)


def test_overlapped_reduction_trains_the_same():
    synchronous = run_distributed(train_layout, 2, args=(_run(False),))
    overlapped = run_distributed(train_layout, 2, args=(_run(True),))
    # megatron-core buckets only when it overlaps (one bucket otherwise)
    assert overlapped["gradient_buckets"] > 1 and synchronous["gradient_buckets"] == 1
    assert_same_training(overlapped, synchronous)
