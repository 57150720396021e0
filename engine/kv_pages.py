"""Host-side bookkeeping of a paged KV cache: which pages are free, and page-table rows.

The device holds `num_pages` pages of `page_size` tokens plus one trash page (index
`num_pages`). A slot's page-table row names the pages of its positions in order; entries past
its allocation, and the rows of free slots, point at the trash page, so a slot that decodes
past its request (the rest of a decode call, or while parked) writes only there.

Offline batches know each request's prompt length and max_tokens up front, so a request gets
every page it can need when it is admitted: no preemption, no mid-decode allocation.
"""

from __future__ import annotations

import numpy as np


class PagePool:
    def __init__(self, num_pages: int, page_size: int, pages_per_slot: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages_per_slot = pages_per_slot
        self.trash = num_pages
        self._free = list(range(num_pages))[::-1]  # pop() hands out low pages first
        self.peak_used = 0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def count_fitting(self, token_counts, limit: int) -> int:
        """How many of the leading requests (each needing token_counts[i] positions, at most
        `limit` of them) the free pages hold together, first come first served."""
        n, budget = 0, len(self._free)
        for tokens in token_counts:
            need = self.pages_for(tokens)
            if n == limit or need > budget:
                break
            budget -= need
            n += 1
        return n

    def take(self, tokens: int) -> list[int]:
        """The pages for `tokens` positions; ValueError if the pool has too few free."""
        n = self.pages_for(tokens)
        if n > self.pages_per_slot:
            raise ValueError(f"{tokens} tokens need {n} pages, more than a slot's {self.pages_per_slot}")
        if n > len(self._free):
            raise ValueError(f"{tokens} tokens need {n} pages; {len(self._free)} are free")
        out = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.used_pages)
        return out

    def give(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def rows(self, page_lists: list[list[int]]) -> np.ndarray:
        """Page-table rows [N, pages_per_slot], trash-filled past each list."""
        out = np.full((len(page_lists), self.pages_per_slot), self.trash, np.int32)
        for i, pages in enumerate(page_lists):
            out[i, :len(pages)] = pages
        return out
