"""The in-process benches' latency figure: the median of many awaited calls."""

import statistics
import time


async def median_latency(call, repeats: int, warmup: int) -> float:
    """Median seconds for C{await call()}, over C{repeats} after C{warmup} calls."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)
