"""Labelled-sequence probes: labels are the true answers, difficulties count sequential steps, specs parse strictly."""

import itertools

import pytest
import torch

from recurchat.data.loader import ProbeLoader
from recurchat.data.tasks.probes import CHASE_POOL, DEFAULT_CHASE_NAMES, PROBES, ProbeBatch, parse_probe, s3_table
from recurchat.errors import UserError


def symbols_and_labels(spec, batch: ProbeBatch) -> tuple[list[list[str]], list[list[str | None]]]:
    """Decode a batch back into symbol names and label names (None where a position has no label)."""
    tokens = spec.probe.vocab.tokens
    xs = [[tokens[i] for i in row] for row in batch.x.tolist()]
    ys = [[tokens[i][1:] if i >= 0 else None for i in row] for row in batch.y.tolist()]
    return xs, ys


def test_parity_labels_are_prefix_parities_and_difficulty_is_position():
    spec = parse_probe("probe:parity:1-12")
    batch = spec.batch(16, seed=3)
    xs, ys = symbols_and_labels(spec, batch)
    for row_x, row_y, row_d in zip(xs, ys, batch.difficulty.tolist()):
        assert row_x[0] == "<|bos|>" and row_y[0] is None and row_d[0] == 0
        ones = 0
        for t in range(1, 13):
            ones += row_x[t] == "x1"
            assert row_y[t] == f"s{ones % 2}"
            assert row_d[t] == t


def test_modsum_and_lower_level_bound():
    spec = parse_probe("probe:modsum:3-6")
    batch = spec.batch(8, seed=0)
    xs, ys = symbols_and_labels(spec, batch)
    for row_x, row_y in zip(xs, ys):
        total = 0
        for t in range(1, 7):
            total += int(row_x[t][1:])
            assert row_y[t] == (f"s{total % 5}" if t >= 3 else None)


def test_s3_is_a_non_abelian_group_and_labels_compose_in_order():
    table, identity = s3_table()
    n = len(table)
    assert n == 6
    assert all(table[identity][a] == a == table[a][identity] for a in range(n))
    assert all(table[table[a][b]][c] == table[a][table[b][c]] for a, b, c in itertools.product(range(n), repeat=3))
    assert any(table[a][b] != table[b][a] for a, b in itertools.product(range(n), repeat=2))
    spec = parse_probe("probe:s3:1-8")
    batch = spec.batch(8, seed=1)
    xs, ys = symbols_and_labels(spec, batch)
    for row_x, row_y in zip(xs, ys):
        state = identity
        for t in range(1, 9):
            state = table[state][int(row_x[t][1:])]
            assert row_y[t] == f"s{state}"


def test_chase_labels_follow_the_chains_and_difficulty_counts_hops():
    spec = parse_probe("probe:chase:1-5")
    batch = spec.batch(32, seed=7)
    xs, ys = symbols_and_labels(spec, batch)
    seen = set()
    for row_x, row_y, row_d in zip(xs, ys, batch.difficulty.tolist()):
        ask = row_x.index("?")
        pairs = dict(zip(row_x[1:ask:2], row_x[2:ask:2]))
        assert len(pairs) == (ask - 1) // 2  # every name is defined once
        queries = [t for t in range(ask + 1, len(row_x)) if row_y[t] is not None]
        assert sorted(row_x[t] for t in queries) == sorted(pairs)  # every name is queried once
        for t in queries:
            name, hops = row_x[t], 0
            while not pairs[name].startswith("v"):
                name, hops = pairs[name], hops + 1
            assert row_y[t] == pairs[name]
            assert row_d[t] == hops + 1
            seen.add(row_d[t])
    assert seen == {1, 2, 3, 4, 5}
    assert batch.x.shape[1] == 1 + 3 * DEFAULT_CHASE_NAMES + 1  # every sequence fills the name budget


def test_chase_hints_walk_each_chain_one_look_up_at_a_time_and_state_tracking_has_none():
    spec = parse_probe("probe:chase:2-4")
    batch = spec.batch(16, seed=11, hints=True)
    assert spec.batch(16, seed=11).hints is None  # built only when asked for
    tokens = spec.probe.vocab.tokens
    xs, ys = symbols_and_labels(spec, batch)
    assert batch.hints.shape == (*batch.x.shape, DEFAULT_CHASE_NAMES)
    for row_x, row_y, row_h in zip(xs, ys, batch.hints.tolist()):
        ask = row_x.index("?")
        pairs = dict(zip(row_x[1:ask:2], row_x[2:ask:2]))
        for t, hints in enumerate(row_h):
            if row_y[t] is None:  # no label (statements, and direct look-ups below the level range): no hints
                assert hints == [-1] * DEFAULT_CHASE_NAMES
                continue
            walk, name = [], row_x[t]
            while not name.startswith("v"):
                name = pairs[name]
                walk.append(name if name.startswith("n") else "=" + name)  # a value is answered by its label
            walk += walk[-1:] * (DEFAULT_CHASE_NAMES - len(walk))
            assert [tokens[h] for h in hints] == walk and walk[-1] == "=" + row_y[t]
    assert parse_probe("probe:parity:1-4").batch(2, seed=0, hints=True).hints is None


def test_chase_names_option_sets_the_budget_and_keeps_the_vocabulary():
    wide = parse_probe("probe:chase:1-8:names=24")
    assert wide.name == "probe:chase:1-8:names=24" and parse_probe(wide.name).name == wide.name
    assert parse_probe("probe:chase:1-4:names=8").name == "probe:chase:1-4"  # the default budget is not spelled out
    assert wide.at_levels(1, 16).name == "probe:chase:1-16:names=24"
    batch = wide.batch(8, seed=1)
    assert batch.x.shape[1] == wide.width == 1 + 2 * 24 + 1 + 24
    assert ((batch.y >= 0).sum(dim=1) == 24).all()  # every one of the 24 names is queried
    assert wide.tokenizer().fingerprint() == parse_probe("probe:chase:1-4").tokenizer().fingerprint()


def test_chase_sequences_have_one_length_whatever_the_levels():
    short, long = parse_probe("probe:chase:1-2"), parse_probe("probe:chase:3-4")
    for spec in (short, long):
        batch = spec.batch(16, seed=3)
        ask = (batch.x == spec.tokenizer().encode("?")[0]).int().argmax(dim=1)
        assert (ask == 1 + 2 * DEFAULT_CHASE_NAMES).all() and batch.x.shape[1] == spec.width
    assert short.width == long.width
    assert set(long.batch(16, seed=3).difficulty[long.batch(16, seed=3).y >= 0].tolist()) <= {3, 4}


def test_within_reach_masks_labels_beyond_r_plus_slack():
    batch = parse_probe("probe:parity:1-8").batch(4, seed=0)
    masked = batch.within_reach(3, 1)
    assert ((masked >= 0) == ((batch.difficulty <= 4) & (batch.y >= 0))).all()
    assert (masked[batch.difficulty <= 4] == batch.y[batch.difficulty <= 4]).all()


def test_tokenizer_round_trips_and_keeps_special_ids():
    for name in PROBES:
        spec = parse_probe(f"probe:{name}:1-4")
        tok = spec.tokenizer()
        batch = spec.batch(2, seed=0)
        text = tok.decode(batch.x[0].tolist())
        assert tok.encode(text) == batch.x[0].tolist()
        assert tok.bos_id == 0 and tok.vocab_size == len(spec.probe.vocab.tokens) <= 64


@pytest.mark.parametrize("spec, message", [
    ("probe:nope:1-4", "unknown probe 'nope'"),
    ("probe:parity:a-b", "bad level range"),
    ("probe:parity:5-2", "levels must satisfy"),
    ("probe:parity:0-3", "levels must satisfy"),
    ("probe:chase:1-9", "chains of at most 8 names"),
    ("probe:chase:1-12:names=10", "chains of at most 10 names"),
    (f"probe:chase:1-4:names={CHASE_POOL + 1}", "names must be an integer in 1..32"),
    ("probe:chase:1-4:size=16", "unknown option 'size=16'"),
    ("probe:parity:1-4:names=16", "it takes none"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_probe(spec)


def test_probe_loader_is_resumable_from_its_state_and_ranks_differ():
    spec = parse_probe("probe:s3:1-6")
    a = ProbeLoader(spec, 4, seed=5)
    for _ in range(3):
        a.next_batch()
    b = ProbeLoader(spec, 4, seed=0)
    b.load_state_dict(a.state_dict())
    (*batch_a, hints_a), (*batch_b, hints_b) = a.next_batch(), b.next_batch()
    assert all(torch.equal(u, v) for u, v in zip(batch_a, batch_b)) and hints_a is hints_b is None  # s3: no hints
    r0, r1 = ProbeLoader(spec, 4, seed=5, world_size=2), ProbeLoader(spec, 4, seed=5, rank=1, world_size=2)
    assert not torch.equal(r0.next_batch()[0], r1.next_batch()[0])
    with pytest.raises(UserError, match="now 'probe:parity"):
        ProbeLoader(parse_probe("probe:parity:1-6"), 4).load_state_dict(a.state_dict())
