"""Continuous batching: which sequences compute how many tokens in the next step.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, oldest first: a decoding one takes 1 token, one still prefilling takes
the next chunk of its prompt that fits the budget (chunked prefill, as Sarathi-Serve and vLLM do,
so a long prompt never stalls everyone's decoding). Then waiting sequences are admitted in
arrival order while budget, seats and cache blocks last; their first chunk starts after whatever
prefix the cache already holds.

When the cache runs out of blocks for a running sequence, the newest running sequence is
preempted: its blocks are released and it waits again at the front, to be recomputed later
(its full blocks usually survive in the prefix cache, so the recompute is mostly hits).
"""

from __future__ import annotations

from collections import deque

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's batch: (sequence, number of new tokens), each sequence once."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):  # oldest first
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older one
            n = min(len(seq) - seq.num_computed, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.blocks.allocate(seq, n):
                # The cache is full: wait for running sequences to finish. Let go of the prefix hits
                # too (they stay cached): a waiting sequence holding blocks could starve everyone.
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take seq out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
