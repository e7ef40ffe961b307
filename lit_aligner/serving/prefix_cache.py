"""Automatic prefix caching for the serving engine (as vLLM's): the keys and values of prompts already prefilled are
kept in blocks of `BLOCK` tokens, so a new prompt that starts with the same tokens (a system prompt, a few-shot
preamble, a chat's earlier turns) under the same Aligner copies them into its cache row instead of computing them.

A block is found by a chain hash: of the Aligner's key, the tokens before it (through its parent's hash) and its own
tokens, so a block stands for its whole prefix. The Aligner is part of the key because it changes the hidden states,
hence the keys and values, of every layer above its first gated one. A hit is checked token by token (its own tokens,
its parent), so a hash collision can only miss, never give another prompt's keys. Blocks are evicted least recently
used first; a lookup or insert touches a chain's blocks deepest first, so a parent is always more recent than its
children and a chain is evicted from its end."""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch

BLOCK = 16  # tokens per block (vLLM's default): prompts share a prefix in whole blocks


@dataclass
class _Block:
    key: Hashable
    parent: Optional[int]  # the chain hash of the block before it (None: the first block)
    tokens: Tuple[int, ...]
    kv: torch.Tensor  # (n_layer, 2, n_kv, BLOCK, head_size)


class PrefixCache:
    """Up to `max_tokens` prompt tokens' keys and values, in blocks; `hit_tokens` counts what lookups found."""

    def __init__(self, max_tokens: int, block: int = BLOCK):
        self.block, self.max_blocks = block, max_tokens // block
        self.blocks: "OrderedDict[int, _Block]" = OrderedDict()
        self.hit_tokens = 0

    def _chain(self, key: Hashable, ids: Sequence[int], n: int) -> List[Tuple[int, Tuple[int, ...]]]:
        """(hash, tokens) of the first n blocks of ids."""
        out, h = [], hash(("lit-aligner prefix", key))
        for i in range(n):
            tokens = tuple(ids[i * self.block:(i + 1) * self.block])
            h = hash((h, tokens))
            out.append((h, tokens))
        return out

    def _touch(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):  # deepest first: the parent ends up more recent than its children
            self.blocks.move_to_end(h)

    def lookup(self, key: Hashable, ids: Sequence[int]) -> Tuple[int, Optional[torch.Tensor]]:
        """The longest cached prefix of `ids` under `key`, in whole blocks and leaving at least the last token to
        compute (its hidden state picks the first new token): (its length, its keys and values (n_layer, 2, n_kv,
        length, head_size)) or (0, None)."""
        found: List[Tuple[int, _Block]] = []
        parent = None
        for h, tokens in self._chain(key, ids, (len(ids) - 1) // self.block):
            b = self.blocks.get(h)
            if b is None or b.key != key or b.parent != parent or b.tokens != tokens:
                break
            found.append((h, b))
            parent = h
        if not found:
            return 0, None
        self._touch([h for h, _ in found])
        n = len(found) * self.block
        self.hit_tokens += n
        return n, torch.cat([b.kv for _, b in found], dim=3)

    def insert(self, key: Hashable, ids: Sequence[int], read: Callable[[int, int], torch.Tensor]) -> None:
        """Keep the whole blocks of a prefilled prompt `ids` under `key`; read(start, end) gives the keys and values of
        its tokens start..end-1 (n_layer, 2, n_kv, end - start, head_size). Blocks already held are not read again."""
        if self.max_blocks == 0:
            return
        chain = self._chain(key, ids, min(len(ids) // self.block, self.max_blocks))
        have = 0
        while have < len(chain) and chain[have][0] in self.blocks:
            have += 1
        if have < len(chain):
            kv = read(have * self.block, len(chain) * self.block)
            for i in range(have, len(chain)):
                h, tokens = chain[i]
                part = kv[:, :, :, (i - have) * self.block:(i - have + 1) * self.block]
                self.blocks[h] = _Block(key, chain[i - 1][0] if i else None, tokens, part.clone())
        self._touch([h for h, _ in chain])
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block
