"""The suite benchmark's GPU timing: kernels of a profile assigned to the jit calls they follow."""

import importlib.util
import pathlib
from types import SimpleNamespace as NS

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "gemm_benchmark", pathlib.Path(__file__).parents[1] / "benchmarks" / "gemm.py")
gemm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gemm)


def _event(name, start, duration):
    return NS(name=name, start_ns=start, duration_ns=duration)


def _profile(dispatches, kernels):
    """A profile with host dispatch events (each with the nested twin JAX
    records), kernels on two streams of GPU 0, and a busy second GPU."""
    host = [e for start, end in dispatches
            for e in (_event("PjitFunction(run)", start, end - start),
                      _event("PjitFunction(run)", start + 1, end - start - 2))]
    streams = [[_event("k", s, d) for s, d in kernels[i::2]] for i in range(2)]
    # A second GPU's kernels overlap call 2; they are not the benchmark's.
    other_gpu = [_event("k", 1100, 5000)]
    return NS(planes=[NS(name="/host:CPU", lines=[NS(name="python3", events=host)]),
                      NS(name="/device:GPU:0", lines=[NS(name=f"Stream #{i}", events=e)
                                                      for i, e in enumerate(streams)]),
                      NS(name="/device:GPU:1", lines=[NS(name="Stream #0", events=other_gpu)])])


def test_spans_run_from_first_to_last_kernel_of_each_call():
    # Call 1 dispatches at 0 and runs kernels 100..500 (with a gap); call 2
    # dispatches at 1000 and runs 1200..1900. A kernel before the first
    # dispatch (the profiler starting) belongs to no call.
    data = _profile([(0, 600), (1000, 2000)],
                    [(-50, 10), (100, 200), (350, 150), (1200, 300), (1500, 400)])
    assert gemm._gpu_call_spans(data, 2) == pytest.approx([400e-9, 700e-9])


def test_spans_refuse_a_profile_that_does_not_match_the_calls():
    data = _profile([(0, 600)], [(100, 200)])
    with pytest.raises(RuntimeError, match="1 jit dispatches, not the 2 calls"):
        gemm._gpu_call_spans(data, 2)
    data = _profile([(0, 600), (1000, 2000)], [(100, 200)])
    with pytest.raises(RuntimeError, match="no GPU activity"):
        gemm._gpu_call_spans(data, 2)
