"""Running many small tensor ops fast on a few cores.

torch splits each large op across its intra-op threads and joins them after every op; for loops of small ops on a
shared machine those joins cost more than the work (20-30x slower when another process holds a core). These helpers
run the ops single-threaded and, where blocks are independent, spread the blocks over Python threads instead: torch
releases the GIL inside each op, so the blocks run in parallel without a join per op.
"""

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import torch

ROWS_BLOCK_ELEMENTS = 1 << 18  # 1 MB of float32 per block of rows: a block's temporaries stay in a core's cache


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Intra-op parallelism off while active; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def over_row_blocks(rows: int, columns: int, work: Callable[[int, int], None]) -> None:
    """Call `work(start, stop)` for consecutive blocks of rows of about `ROWS_BLOCK_ELEMENTS` elements, on as many
    Python threads as torch was set to use. `work` must only write its own rows."""
    step = max(1, ROWS_BLOCK_ELEMENTS // max(columns, 1))
    blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    threads = min(torch.get_num_threads(), len(blocks))
    with one_torch_thread():
        if threads <= 1:
            for start, stop in blocks:
                work(start, stop)
            return
        for future in [_pool(threads).submit(work, start, stop) for start, stop in blocks]:
            future.result()


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    # Kept for the process's life: starting threads for every weight costs more than quantizing small ones.
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="row-blocks")
