"""Host-side bookkeeping of a paged KV cache: which pages are free, which hold a cached prompt
prefix, and page-table rows.

The device holds `num_pages` pages of `page_size` tokens plus one trash page (index
`num_pages`). A slot's page-table row names the pages of its positions in order; entries past
its allocation, and the rows of free slots, point at the trash page, so a slot that decodes
past its request (the rest of a decode call, or while parked) writes only there.

Offline batches know each request's prompt length and max_tokens up front, so a request gets
every page it can need when it is admitted: no preemption, no mid-decode allocation.

Prefix caching: a page filled entirely by prompt tokens is named by a content hash chained
over every token before it (`prefix_hashes`). Once its prefill is dispatched it is indexed
under that hash; a later request whose prompt starts with the same pages takes them
(reference counted) and prefills only the rest. Pages nobody holds keep their contents and
stay indexed until the pool runs short: then the least recently released are taken back
(evicted). The index lives with one engine's pool, so pages never cross models, dtypes or
quantization settings. Cached pages are only read: a slot writes its own pages from its first
uncached position on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np


def prefix_hashes(ids, page_size: int) -> tuple[bytes, ...]:
    """The chained content hash of each page that the prompt `ids` fills."""
    out, h = [], b""
    for j in range(len(ids) // page_size):
        page = np.asarray(ids[j * page_size:(j + 1) * page_size], np.int64).tobytes()
        h = hashlib.blake2b(h + page, digest_size=16).digest()
        out.append(h)
    return tuple(out)


class PagePool:
    def __init__(self, num_pages: int, page_size: int, pages_per_slot: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages_per_slot = pages_per_slot
        self.trash = num_pages
        self._free = list(range(num_pages))[::-1]  # pop() hands out low pages first
        self.peak_used = 0
        self._refs = np.zeros(num_pages, np.int32)  # holders of each page
        self._hash_of: dict[int, bytes] = {}  # indexed page -> its prefix hash
        self._page_of: dict[bytes, int] = {}  # prefix hash -> page
        self._idle: OrderedDict[int, None] = OrderedDict()  # indexed pages nobody holds, oldest first

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        """Pages a request can take: never used, or holding a cached prefix nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    @property
    def cached_pages(self) -> int:
        return len(self._hash_of)

    def match(self, hashes: tuple, prompt_tokens: int) -> list[int]:
        """The cached pages of the longest indexed run of a prompt's prefix hashes, leaving its
        last token to compute (the first generated token needs its logits)."""
        out = []
        for h in hashes[:(prompt_tokens - 1) // self.page_size]:
            page = self._page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def count_fitting(self, requests, limit: int) -> int:
        """How many of the leading requests (each (positions it needs, its cached pages), at most
        `limit` of them) the free pages hold together, first come first served. A cached page
        someone holds costs nothing; one nobody holds comes out of the free pages once."""
        n, budget, pinned = 0, self.free_pages, set()
        for tokens, hit in requests:
            cost = self.pages_for(tokens) - len(hit)
            cost += sum(1 for p in hit if self._refs[p] == 0 and p not in pinned)
            if n == limit or cost > budget:
                break
            budget -= cost
            pinned.update(hit)
            n += 1
        return n

    def hold(self, pages: list[int]) -> None:
        """One more hold on each (cached) page: it cannot be evicted until given back."""
        for p in pages:
            if self._refs[p] == 0:
                self._idle.pop(p, None)
            self._refs[p] += 1

    def take(self, tokens: int, held: Optional[list] = None) -> list[int]:
        """The pages for `tokens` positions: the cached pages `held` (from `match`, already
        held) first, then new ones; ValueError if the pool has too few free."""
        held = list(held or [])
        n = self.pages_for(tokens)
        if n > self.pages_per_slot:
            raise ValueError(f"{tokens} tokens need {n} pages, more than a slot's {self.pages_per_slot}")
        if n - len(held) > self.free_pages:
            raise ValueError(f"{tokens} tokens need {n - len(held)} new pages; {self.free_pages} are free")
        out = held + [self._fresh() for _ in range(n - len(held))]
        self.peak_used = max(self.peak_used, self.used_pages)
        return out

    def _fresh(self) -> int:
        """A page for new contents: a never-used one, else the longest idle cached one (evicted)."""
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
        self._refs[page] = 1
        return page

    def give(self, pages: list[int]) -> None:
        """Release one hold on each page: unheld pages go back to the pool, cached ones idle."""
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._hash_of:
                    self._idle[p] = None
                else:
                    self._free.append(p)

    def index(self, hashes: tuple, pages: list[int]) -> None:
        """Index a request's full prompt pages under their prefix hashes (its prefill is
        dispatched: any later reader runs after it on the device). Hashes already indexed keep
        their page."""
        for h, p in zip(hashes, pages):
            if h not in self._page_of and p not in self._hash_of:
                self._page_of[h] = p
                self._hash_of[p] = h

    def forget_prefixes(self) -> None:
        """Drop the prefix index: idle cached pages become free pages (benchmarks start cold)."""
        self._free.extend(self._idle)
        self._idle.clear()
        self._hash_of.clear()
        self._page_of.clear()

    def rows(self, page_lists: list[list[int]]) -> np.ndarray:
        """Page-table rows [N, pages_per_slot], trash-filled past each list."""
        out = np.full((len(page_lists), self.pages_per_slot), self.trash, np.int32)
        for i, pages in enumerate(page_lists):
            out[i, :len(pages)] = pages
        return out
