"""Labelled-sequence probes: token sequences with a label at chosen positions, where more iterations should help.

    recurchat train --preset probe --data probe:parity:1-8 --out runs/parity        # train on difficulties 1..8
    recurchat eval --ckpt runs/parity --tasks probe:parity:1-16 --recur 1,4,8,16   # accuracy by difficulty × r

A probe is token classification over reserved label tokens, not next-token prediction: the target at a labelled
position is a label token (never an input symbol), so the same RecurrentLM, trainer and head train on it, and the
loss reads only those positions. The difficulty of a label is the number of sequential steps its answer needs.

- State tracking (`parity`, `modsum` = running sum mod 5, `s3` = composition in the symmetric group S3, which is
  not abelian, so the step is not always a bit flip): the label at position t is the state after the first t
  symbols; difficulty t. A level range `1-8` means strings of 8 symbols, labelled at every position.
- `chase`: in-context multi-query pointer chasing. Statements `name value` (a constant) and `name name` (an alias)
  for several chains, shuffled, then `?` and queries: every name of every chain once, in random order, each
  labelled with its chain's value. Difficulty = hops + 1 (1 is a direct look-up). A level range `1-3` draws chains
  of 1..3 names until the sequence holds its budget of names (`probe:chase:1-3:names=16`; 8 when not given; the last
  chain cut to fit), each chain ending in a value drawn from CHASE_VALUES: every sequence has the same length and
  the same number of statements and queries whatever its levels, so held-out levels differ from trained ones in
  hops only, never in context length or in how far a query is from its statements (with chains of a fixed count,
  longer chains meant longer sequences, and a model trained on 1-2 failed direct look-ups in the longer sequences
  of 1-4). The budget bounds the longest chain and sets how many other chains share a sequence with it: with 8
  names a chain of 8 is alone and every query has the same answer, so held-out long chains need a larger budget to
  stay hard. Every budget draws its names from the same CHASE_POOL, so one vocabulary (and one checkpoint) serves
  them all. Chase batches can also carry *hints* (`ProbeBatch.hints`, when asked): for each query, the token its
  chain reaches after 1, 2, … look-ups — the next names, then the value's label from the end of the chain on — the
  intermediate targets the trainer's `--hint-weight` supervises, one look-up per iteration (CLRS-style hints,
  arXiv 2205.15659).

Sequences are generated from a seed, so a split is a seed range: training draws from (seed, batch index), eval
from a disjoint seed space (`EVAL_SEED`). Exercised by `pytest tests/data/tasks/test_task_probes.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from recurchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from recurchat.errors import UserError

PREFIX = "probe:"
EVAL_SEED = 1 << 40  # eval sequences are seeded from here on; training seeds stay far below it
CHASE_POOL = 32  # name tokens in the chase vocabulary; a sequence uses `names` of them
CHASE_VALUES = 10
DEFAULT_CHASE_NAMES = 8  # names per chase sequence unless the spec says `:names=N`: 8 statements, `?`, 8 queries
MAX_LEVEL = 64


@dataclass(frozen=True)
class ProbeBatch:
    x: torch.Tensor  # [B, T] token ids, <|bos|> first
    y: torch.Tensor  # [B, T] label token ids, -1 where a position has no label
    difficulty: torch.Tensor  # [B, T] steps each label needs, 0 where there is no label
    # [B, T, H] token each labelled position's answer path reaches after 1..H steps (-1 elsewhere); None for probes
    # without intermediate targets
    hints: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.size(0)

    def chunks(self, size: int):
        """The batch as consecutive ProbeBatches of at most `size` rows."""
        for i in range(0, len(self), size):
            yield ProbeBatch(self.x[i:i + size], self.y[i:i + size], self.difficulty[i:i + size],
                             None if self.hints is None else self.hints[i:i + size])

    def within_reach(self, r: int, slack: int) -> torch.Tensor:
        """y with the labels that r iterations (plus `slack` steps of prelude and coda) cannot reach set to -1."""
        return within_reach(self.y, self.difficulty, r, slack)


def within_reach(y: torch.Tensor, difficulty: torch.Tensor, r: int, slack: int) -> torch.Tensor:
    """Labels y with those of difficulty > r + slack set to -1 (the trainer's --loss-reach)."""
    return torch.where(difficulty <= r + slack, y, torch.full_like(y, -1))


class Vocabulary:
    """Token ids: recurchat's special tokens first (ids 0..7), then input symbols, then label tokens."""

    def __init__(self, symbols: list[str], labels: list[str]):
        self.symbols, self.labels = symbols, labels
        self.tokens = [*SPECIAL_TOKENS, *symbols, *(f"={label}" for label in labels)]
        self.first_symbol, self.first_label = len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(symbols)

    def tokenizer(self) -> Tokenizer:
        """A word-level tokenizer over these tokens (whitespace-separated), saved with every probe checkpoint."""
        vocab = {token: i for i, token in enumerate(self.tokens)}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        hf.add_special_tokens(SPECIAL_TOKENS)
        return Tokenizer(hf)


def with_bos(symbols: torch.Tensor, labels: torch.Tensor, steps: torch.Tensor, vocab: Vocabulary) -> ProbeBatch:
    """Symbol and label indices [B, T] (label −1: none) → a ProbeBatch with <|bos|> in front and token ids."""
    B = symbols.size(0)
    bos = torch.zeros(B, 1, dtype=torch.long)
    none = torch.full((B, 1), -1, dtype=torch.long)
    y = torch.where(labels >= 0, labels + vocab.first_label, labels)
    return ProbeBatch(torch.cat([bos, symbols + vocab.first_symbol], 1), torch.cat([none, y], 1),
                      torch.cat([torch.zeros_like(bos), torch.where(labels >= 0, steps, 0)], 1))


class StateTracking:
    """The state after each prefix of a random word in a finite monoid, given by its multiplication table."""

    def __init__(self, name: str, table: list[list[int]], identity: int, description: str):
        self.name, self.description, self.identity = name, description, identity
        self.table = torch.tensor(table, dtype=torch.long)
        n = len(table)
        self.vocab = Vocabulary([f"x{i}" for i in range(n)], [f"s{i}" for i in range(n)])
        self.chance = 1.0 / n

    options, option_help = "", ""  # state tracking takes no `:key=value` options
    has_hints = False  # its labels are already every step's state
    max_level = MAX_LEVEL
    level_limit = f"levels up to {MAX_LEVEL}"

    def with_options(self, options: list[str]) -> StateTracking:
        raise UserError(f"probe {self.name!r}: unknown option {':'.join(options)!r} (it takes none)")

    def max_width(self, levels: list[int]) -> int:
        """Tokens in the longest sequence of these levels: <|bos|> and one symbol per step."""
        return 1 + max(levels)

    def batch(self, levels: list[int], n: int, g: torch.Generator, hints: bool = False) -> ProbeBatch:
        length = max(levels)
        x = torch.randint(0, self.table.size(0), (n, length), generator=g)
        state = torch.full((n,), self.identity, dtype=torch.long)
        labels = torch.empty_like(x)
        for t in range(length):
            state = self.table[state, x[:, t]]
            labels[:, t] = state
        steps = torch.arange(1, length + 1).expand(n, length)
        labels = torch.where((steps >= min(levels)), labels, -1)
        return with_bos(x, labels, steps, self.vocab)


def s3_table() -> tuple[list[list[int]], int]:
    """S3's multiplication table over its six permutations (a∘b: apply b, then a) and the identity's index."""
    perms = list(itertools.permutations(range(3)))
    table = [[perms.index(tuple(a[b[i]] for i in range(3))) for b in perms] for a in perms]
    return table, perms.index((0, 1, 2))


class PointerChase:
    """Multi-query pointer chasing in context: alias chains filling a budget of `names`, every name queried."""

    name = "chase"
    chance = 1.0 / CHASE_VALUES
    has_hints = True
    option_help = ":names=N"

    def __init__(self, names: int = DEFAULT_CHASE_NAMES):
        self.names = names
        self.description = (f"in-context pointer chasing: chains of {names} names per sequence (`:names=N` sets it), "
                            "every name queried; difficulty = hops + 1")
        self.vocab = Vocabulary([*(f"n{i}" for i in range(CHASE_POOL)), *(f"v{i}" for i in range(CHASE_VALUES)), "?"],
                                [f"v{i}" for i in range(CHASE_VALUES)])

    @property
    def options(self) -> str:
        """The spec's option suffix: `:names=N` when the budget is not the default."""
        return "" if self.names == DEFAULT_CHASE_NAMES else f":names={self.names}"

    @property
    def max_level(self) -> int:
        return self.names  # the longest chain a sequence holds

    @property
    def level_limit(self) -> str:
        return f"chains of at most {self.names} names (the sequence's budget; `:names=N` raises it)"

    def with_options(self, options: list[str]) -> PointerChase:
        """This probe with `names=N` (its budget per sequence), the one option it takes."""
        key, _, value = options[0].partition("=")
        if len(options) > 1 or key != "names":
            raise UserError(f"probe 'chase': unknown option {':'.join(options)!r} (chase takes names=N)")
        if not value.isdigit() or not 1 <= int(value) <= CHASE_POOL:
            raise UserError(f"probe 'chase': names must be an integer in 1..{CHASE_POOL}, got {value!r}")
        return PointerChase(int(value))

    def max_width(self, levels: list[int]) -> int:
        """<|bos|>, two tokens per statement, `?`, one query per name: the same for every level range."""
        return 1 + 2 * self.names + 1 + self.names

    def lengths(self, levels: list[int], g: torch.Generator) -> list[int]:
        """Chain lengths drawn from `levels` until they hold the budget of names; the last one is cut to fit."""
        out: list[int] = []
        while sum(out) < self.names:
            drawn = levels[int(torch.randint(len(levels), (1,), generator=g))]
            out.append(min(drawn, self.names - sum(out)))
        return out

    def sequence(self, levels: list[int], g: torch.Generator) -> tuple[list[int], list[int], list[int], list]:
        """(symbol indices, label per position or -1, difficulty per position, hint tokens per position: the
        query's path of names toward its value as token ids, [] where a position has no label) for one sequence."""
        names = torch.randperm(CHASE_POOL, generator=g).tolist()
        statements, queries = [], []
        for length in self.lengths(levels, g):
            chain, names = names[:length], names[length:]
            value = int(torch.randint(CHASE_VALUES, (1,), generator=g))
            statements.append((chain[0], CHASE_POOL + value))
            statements += [(b, a) for a, b in zip(chain, chain[1:])]
            # the name chain[k] looks up chain[k-1], then chain[k-2], …, then chain[0]'s value
            queries += [(name, value, hops + 1, chain[:hops][::-1]) for hops, name in enumerate(chain)]
        order = torch.randperm(len(statements), generator=g).tolist()
        ask = torch.randperm(len(queries), generator=g).tolist()
        symbols = [s for i in order for s in statements[i]] + [CHASE_POOL + CHASE_VALUES]
        labels, steps, hints = [-1] * len(symbols), [0] * len(symbols), [[] for _ in symbols]
        for i in ask:
            name, value, difficulty, path = queries[i]
            labelled = difficulty >= min(levels)
            symbols.append(name)
            labels.append(value if labelled else -1)
            steps.append(difficulty)
            hints.append([self.vocab.first_symbol + n for n in path] + [self.vocab.first_label + value]
                         if labelled else [])
        return symbols, labels, steps, hints

    def batch(self, levels: list[int], n: int, g: torch.Generator, hints: bool = False) -> ProbeBatch:
        """n sequences; with `hints`, their hint tensor too (only a run that trains on hints pays for building it)."""
        rows = [self.sequence(levels, g) for _ in range(n)]
        width = max(len(s) for s, _, _, _ in rows)
        pad = self.vocab.tokens.index("<|pad|>") - self.vocab.first_symbol  # padding after the last query

        def column(i: int, fill: int) -> torch.Tensor:
            return torch.tensor([row[i] + [fill] * (width - len(row[i])) for row in rows], dtype=torch.long)

        batch = with_bos(column(0, pad), column(1, -1), column(2, 0), self.vocab)
        return dataclasses.replace(batch, hints=self.hint_tensor([row[3] for row in rows], width)) if hints else batch

    def hint_tensor(self, rows: list[list[list[int]]], width: int) -> torch.Tensor:
        """[B, 1 + width, names] hint tokens (<|bos|> first), each path held at its value label to the budget's
        length (the longest path a sequence holds); -1 at positions without a label."""
        out = torch.full((len(rows), 1 + width, self.names), -1, dtype=torch.long)
        at = [(b, 1 + t, path + path[-1:] * (self.names - len(path)))
              for b, row in enumerate(rows) for t, path in enumerate(row) if path]
        if at:  # one indexed write: a tensor per position would cost more than drawing the sequences
            b, t, paths = zip(*at)
            out[torch.tensor(b), torch.tensor(t)] = torch.tensor(paths)
        return out


def _probes() -> dict:
    s3, s3_identity = s3_table()
    return {p.name: p for p in (
        StateTracking("parity", [[0, 1], [1, 0]], 0, "prefix parity of a bit string; difficulty = position"),
        StateTracking("modsum", [[(a + b) % 5 for b in range(5)] for a in range(5)], 0,
                      "running sum mod 5; difficulty = position"),
        StateTracking("s3", s3, s3_identity, "running product in S3 (non-abelian); difficulty = position"),
        PointerChase())}


PROBES = _probes()


@dataclass(frozen=True)
class ProbeSpec:
    """`probe:NAME:LO-HI`: a probe and the difficulties it draws."""

    probe: object
    levels: list[int]

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.probe.name}:{self.levels[0]}-{self.levels[-1]}{self.probe.options}"

    def at_levels(self, lo: int, hi: int) -> ProbeSpec:
        """The same probe (and options) drawing difficulties lo..hi instead."""
        return ProbeSpec(self.probe, list(range(lo, hi + 1)))

    def batch(self, n: int, seed: int, hints: bool = False) -> ProbeBatch:
        """n sequences from `seed`; `hints`: with the probe's intermediate targets, where it has them."""
        return self.probe.batch(self.levels, n, torch.Generator().manual_seed(seed), hints)

    @property
    def width(self) -> int:
        """The longest sequence this spec can draw, in tokens (a batch is padded to its own longest row)."""
        return self.probe.max_width(self.levels)

    def tokenizer(self) -> Tokenizer:
        return self.probe.vocab.tokenizer()


def is_probe(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def parse_probe(spec: str) -> ProbeSpec:
    """"probe:parity:1-8", "probe:chase:1-4:names=16" → ProbeSpec; a one-line UserError naming the problem
    otherwise."""
    body = spec.strip()[len(PREFIX):] if is_probe(spec) else spec.strip()
    name, *rest = body.split(":")
    levels, options = (rest[0] if rest else ""), rest[1:]
    if name not in PROBES:
        raise UserError(f"unknown probe {name!r} (choices: {', '.join(sorted(PROBES))}); e.g. probe:parity:1-8")
    lo, _, hi = (levels or "1-8").partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"probe {name!r}: bad level range {levels!r} (expected LO-HI, e.g. 1-8)") from None
    if not 1 <= lo_i <= hi_i <= MAX_LEVEL:
        raise UserError(f"probe {name!r}: levels must satisfy 1 <= LO <= HI <= {MAX_LEVEL}, got {levels!r}")
    probe = PROBES[name].with_options(options) if options else PROBES[name]
    if hi_i > probe.max_level:
        raise UserError(f"probe {name!r}: {probe.level_limit}, got {hi_i}")
    return ProbeSpec(probe, list(range(lo_i, hi_i + 1)))


def same_vocabulary(spec: ProbeSpec, tokenizer: Tokenizer) -> bool:
    """Whether a checkpoint's tokenizer is this probe's (so its ids mean the same symbols and labels)."""
    return spec.tokenizer().fingerprint() == tokenizer.fingerprint()
