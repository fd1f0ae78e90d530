"""Concurrent callers: several threads (and, on a GPU, several CUDA streams) merging at
once must each get exactly the single-threaded result.

The shared state on the call path is the backend-decision cache, the Triton and CUDA
compiled-kernel caches and the build cache; this test makes many threads race through
them from cold. (Triton's CPU interpreter patches triton.language globally while a kernel
runs, so it is not thread-safe; on a CPU only the torch backend is raced here.)
"""

from __future__ import annotations

import threading

import pytest
import torch
from utils import ON_GPU, make_case

from attnmerge import dispatch

THREADS = 8
CALLS_PER_THREAD = 6

BACKENDS = ["torch", "triton", "cuda"] if ON_GPU else ["torch"]
DEVICE = "cuda" if ON_GPU else "cpu"


def _cases(thread: int) -> list:
    # Different head sizes and dtypes per call: cold kernel caches are hit concurrently.
    shapes = [(17, 3, 72), (5, 8, 128), (33, 2, 80), (1, 16, 192), (9, 4, 8), (64, 2, 256)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    cases = []
    for i in range(CALLS_PER_THREAD):
        T, H, D = shapes[(thread + i) % len(shapes)]
        cases.append(
            make_case(
                T,
                H,
                D,
                dtype=dtypes[(thread + i) % 3],
                device=DEVICE,
                lse_pattern="mixed",
                seed=1000 * thread + i,
            )
        )
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_and_streams_give_exact_results(backend):
    dispatch.reset()
    per_thread = [_cases(t) for t in range(THREADS)]
    expected = [[c.expected() for c in cases] for cases in per_thread]
    if ON_GPU:
        torch.cuda.synchronize()  # inputs were written on the default stream
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        try:
            stream = torch.cuda.Stream() if ON_GPU else None
            start.wait()
            for case in per_thread[t]:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        case.run(backend)
                else:
                    case.run(backend)
            if stream is not None:
                stream.synchronize()
        except BaseException as e:  # reported below, with the thread's cases
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for cases, exps in zip(per_thread, expected, strict=True):
        for case, exp in zip(cases, exps, strict=True):
            case.check_against(exp)
