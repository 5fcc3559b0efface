"""The engine's BLAS pin holds in any thread (threadpoolctl >= 3.8 heeds one controlling thread)."""

from __future__ import annotations

import threading

from threadpoolctl import threadpool_info

from rmidl.kernels import blas_pinned


def blas_thread_counts() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_pin_takes_effect_in_a_thread_after_the_main_thread_pinned() -> None:
    with blas_pinned():  # the main thread becomes threadpoolctl's controlling thread here
        assert set(blas_thread_counts()) == {1}
    seen: list[list[int]] = []

    def in_thread() -> None:
        with blas_pinned():
            seen.append(blas_thread_counts())
        seen.append(blas_thread_counts())

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    outside = blas_thread_counts()
    assert set(seen[0]) == {1}, f"BLAS not pinned inside a non-main thread: {seen[0]}"
    assert seen[1] == outside, "the original BLAS thread count was not restored"


def test_pins_nest_across_threads() -> None:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with blas_pinned():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(10)
    with blas_pinned():
        pass
    assert set(blas_thread_counts()) == {1}, "one thread's unpin undid another thread's pin"
    release.set()
    holder.join(10)
