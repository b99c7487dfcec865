"""Python's garbage collector during a run: collected, then frozen while the run trains, and the collections inside
the timed epochs and final evaluation counted in the summary."""

import gc
import json
import weakref

from helpers import FAST, run_train

from fasttrain.loop.collector import GcCounts, frozen_heap


class Node:
    """An object in a reference cycle: only the collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_the_heap_is_collected_then_frozen_and_collectable_again_once_the_block_ends():
    before = Node()  # garbage already when the block starts: collected on the way in, not frozen for the run
    gone_before = weakref.ref(before)
    del before
    during = Node()
    gone_during = weakref.ref(during)
    with frozen_heap():
        assert gone_before() is None
        del during
        gc.collect()
        assert gone_during() is not None, "frozen: a full collection skipped it"
    gc.collect()
    assert gone_during() is None, "unfrozen: the next full collection freed it"


def test_collections_are_counted_by_generation_only_inside_the_spans():
    counts = GcCounts()
    gc.collect()  # outside: not counted
    with counts:
        gc.collect(1)
    with counts:
        gc.collect(2)
    gc.collect(0)
    assert counts.collections[1] >= 1 and counts.collections[2] == 1
    assert sum(counts.collections) <= 4, counts.collections  # another thread's young collection, at most


# A real run whose third training step starts with a full collection; it reports what the steps saw.
COLLECT_AT_THE_THIRD_STEP = """
import gc, json, sys
from fasttrain import train
from fasttrain.loop.engine import StepEngine

step, frozen, at_start = StepEngine.step, [], gc.get_freeze_count()  # Python 3.12 starts with some frozen
def collect_then_step(self, *args, **kwargs):
    frozen.append(gc.get_freeze_count())
    if len(frozen) == 3:
        gc.collect()
    return step(self, *args, **kwargs)
StepEngine.step = collect_then_step
code = train.main(sys.argv[1:])
print(json.dumps({"at_start": at_start, "in_steps": min(frozen), "after": gc.get_freeze_count()}))
sys.exit(code)
"""


def test_a_collection_inside_the_epochs_is_in_the_summary_and_the_run_trains_on_a_frozen_heap(
    cifar_slice_dir, tmp_path
):
    run_dir = tmp_path / "run"
    args = [*FAST, "--train.epochs", "1", "--data.dir", str(cifar_slice_dir), "--run.dir", str(run_dir)]
    proc = run_train(args, tmp_path, timeout=300, script=COLLECT_AT_THE_THIRD_STEP)  # raises if it fails
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["in_steps"] > seen["at_start"] + 100_000, "torch's and the run's objects are frozen while it trains"
    assert seen["after"] <= seen["at_start"], "and unfrozen once it ends"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gc_collections"][2] == 1, "the third step's full collection, and none in the rest of the epochs"
