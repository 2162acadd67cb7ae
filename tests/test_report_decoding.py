"""Greedy and beam search on toy models whose sequence probabilities are known exactly; trigram
blocking; the same number of steps on every rank (2 gloo processes with uneven finishing times)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from ranks import run_ranks

from xray_pretrain.collectives import all_ranks_true
from xray_pretrain.models.decoding import ban_repeated_trigrams, beam_search, greedy_search

PAD, BOS, EOS, A, B, C = range(6)
WORDS = (EOS, A, B, C)
NEVER = float("-inf")


class ToyModel:
    """P(next | prefix) from a table keyed by (sample, prefix of words), a default distribution
    elsewhere. Keeps each row's prefix itself (as a decoder keeps its key cache) so that beam search's
    ``reorder`` is exercised too."""

    def __init__(
        self, tables: list[dict[tuple, dict[int, float]]], default: dict[int, float], rows_per_sample: int
    ):
        self.tables, self.default, self.rows_per_sample = tables, default, rows_per_sample
        self.prefixes: list[tuple] = [() for _ in range(len(tables) * rows_per_sample)]
        self.num_steps = 0

    def probs(self, sample: int, prefix: tuple) -> dict[int, float]:
        return self.tables[sample].get(prefix, self.default)

    def step(self, last_N: torch.Tensor, position: int) -> torch.Tensor:
        self.num_steps += 1
        if position > 0:
            self.prefixes = [p + (int(t),) for p, t in zip(self.prefixes, last_N)]
        out = torch.full((len(self.prefixes), 6), NEVER)
        for n, prefix in enumerate(self.prefixes):
            for token, p in self.probs(n // self.rows_per_sample, prefix).items():
                out[n, token] = math.log(p)
        return out

    def reorder(self, index_N: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index_N.tolist()]

    def best_by_enumeration(self, sample: int, max_words: int) -> tuple[tuple, float]:
        """Highest-probability sequence of at most max_words generated ids (ended by <eos>, or cut)."""
        best, best_lp = (), NEVER
        for length in range(1, max_words + 1):
            for seq in itertools.product(WORDS, repeat=length):
                if EOS in seq[:-1] or (seq[-1] != EOS and length < max_words):
                    continue
                lp = sum(math.log(self.probs(sample, seq[:i]).get(t, 0) or 1e-300) for i, t in enumerate(seq))
                if lp > best_lp:
                    best, best_lp = seq, lp
        return best, best_lp


def search(model: ToyModel, beam: int, max_length: int, **kwargs):
    common = dict(batch_size=len(model.tables), max_length=max_length, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    if beam == 1:
        return greedy_search(model.step, **common, **kwargs)
    return beam_search(model.step, model.reorder, beam_size=beam, **common, **kwargs)


def strip(ids) -> tuple:
    ids = [int(i) for i in ids if int(i) != PAD]
    return tuple(ids)


GREEDY_TRAP = {  # greedy takes A (0.5) then ends: 0.5 * 0.4 = 0.2; B then <eos> is 0.4 * 0.9 = 0.36
    (): {A: 0.5, B: 0.4, EOS: 0.1},
    (A,): {EOS: 0.4, A: 0.3, B: 0.3},
    (B,): {EOS: 0.9, A: 0.05, B: 0.05},
}
DEFAULT = {EOS: 0.6, A: 0.2, B: 0.1, C: 0.1}


def test_beam_finds_the_known_best_sequence_greedy_misses():
    greedy = search(ToyModel([GREEDY_TRAP], DEFAULT, 1), beam=1, max_length=6)
    assert strip(greedy[0]) == (A, EOS)
    model = ToyModel([GREEDY_TRAP], DEFAULT, 3)
    result = search(model, beam=3, max_length=6, block_trigrams=False)
    assert strip(result.ids_BT[0]) == (B, EOS)
    assert result.log_prob_B[0].item() == pytest.approx(math.log(0.36))


def random_table(seed: int, depth: int) -> dict[tuple, dict[int, float]]:
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for length in range(depth):
        for prefix in itertools.product((A, B, C), repeat=length):
            p = torch.rand(len(WORDS), generator=gen) ** 3 + 0.01  # peaked: greedy is often wrong
            table[prefix] = dict(zip(WORDS, (p / p.sum()).tolist()))
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_is_exact_on_random_toys_batched(seed):
    # 3 words + <eos> per step, 3 steps: 27 beams hold every partial hypothesis, so beam search is
    # exhaustive and must return the enumerated optimum for each sample of the batch.
    tables = [random_table(seed * 10 + s, depth=3) for s in range(2)]
    model = ToyModel(tables, DEFAULT, 27)
    result = search(model, beam=27, max_length=4, block_trigrams=False)
    for sample in range(2):
        best, best_lp = model.best_by_enumeration(sample, max_words=3)
        assert strip(result.ids_BT[sample]) == best
        assert result.log_prob_B[sample].item() == pytest.approx(best_lp, abs=1e-5)


def test_length_penalty_changes_the_winner():
    # '<eos>' alone: 0.4 (log -0.92, 1 id); 'A <eos>': 0.6 * 0.6 = 0.36 (log -1.02, 2 ids: -0.51 per id).
    table = {(): {EOS: 0.4, A: 0.6}, (A,): {EOS: 0.6, A: 0.4}}
    plain = search(ToyModel([table], DEFAULT, 2), beam=2, max_length=5, block_trigrams=False)
    assert strip(plain.ids_BT[0]) == (EOS,)
    normalized = search(
        ToyModel([table], DEFAULT, 2), beam=2, max_length=5, length_penalty=1.0, block_trigrams=False
    )
    assert strip(normalized.ids_BT[0]) == (A, EOS)
    assert normalized.score_B[0].item() == pytest.approx(math.log(0.36) / 2)


def test_ban_repeated_trigrams():
    tokens = torch.tensor([[BOS, A, B, C, A, B], [BOS, A, A, A, A, A]])
    log_probs = torch.zeros(2, 6)
    ban_repeated_trigrams(tokens, log_probs)
    assert log_probs[0].tolist() == [0, 0, 0, 0, 0, NEVER]  # C would repeat 'A B C'
    assert log_probs[1].tolist() == [0, 0, 0, NEVER, 0, 0]  # A would repeat 'A A A'


def test_greedy_with_trigram_blocking_by_hand():
    prefs = {A: 0.5, B: 0.3, C: 0.15, EOS: 0.05}  # the same everywhere
    out = search(ToyModel([{}], prefs, 1), beam=1, max_length=8, block_trigrams=True)
    # a a a | 'a' would repeat (a a a): b | a | a | (a a) then a or b repeat a trigram: c
    assert strip(out[0]) == (A, A, A, B, A, A, C)


@pytest.mark.parametrize("beam", [1, 3])
def test_pad_and_bos_are_never_generated(beam):
    class Babbler(ToyModel):
        def step(self, last_N, position):
            out = super().step(last_N, position)
            out[:, PAD], out[:, BOS] = 0.0, -0.1  # the model's favourites: both forbidden
            return out

    out = search(Babbler([{}], DEFAULT, beam), beam=beam, max_length=6, block_trigrams=False)
    ids = out if beam == 1 else out.ids_BT
    assert strip(ids[0]) == (EOS,)  # DEFAULT's best real token


def test_fixed_number_of_steps_gives_the_same_result():
    early = ToyModel([GREEDY_TRAP], DEFAULT, 3)
    fixed = ToyModel([GREEDY_TRAP], DEFAULT, 3)
    a = search(early, beam=3, max_length=9)
    b = search(fixed, beam=3, max_length=9, all_finished=lambda done: False)
    assert early.num_steps < fixed.num_steps == 8
    assert strip(a.ids_BT[0]) == strip(b.ids_BT[0]) and torch.equal(a.log_prob_B, b.log_prob_B)


def test_every_rank_runs_the_same_number_of_steps():
    def on_rank(rank: int):
        # Rank 0's sample ends after one word, rank 1's runs to max_length (never <eos> before).
        table = {(): {A: 0.9, EOS: 0.1}, (A,): {EOS: 1.0}} if rank == 0 else {}
        default = {EOS: 1e-6, A: 1 - 1e-6} if rank == 1 else DEFAULT
        model = ToyModel([table], default, 3)

        def everyone_done(done: bool) -> bool:
            return all_ranks_true(done, torch.device("cpu"))

        out = search(model, beam=3, max_length=7, block_trigrams=False, all_finished=everyone_done)
        return model.num_steps, strip(out.ids_BT[0])

    results = run_ranks(on_rank)
    assert results[0] == (6, (A, EOS))  # done after 2 steps, kept stepping with rank 1
    assert results[1] == (6, (A,) * 6)


def test_sampling_follows_the_model_distribution():
    """4,000 rows of one toy sample: first-word frequencies match its probabilities; a word follows
    its prefix's table; <pad> and <bos> (the toy's favourites) are never drawn; finished rows pad."""
    from xray_pretrain.models.decoding import sample_search

    class Babbler(ToyModel):
        def step(self, last_N, position):
            out = super().step(last_N, position)
            out[:, PAD], out[:, BOS] = 0.0, 0.0
            return out

    table = {(): {A: 0.6, B: 0.3, EOS: 0.1}, (A,): {EOS: 1.0}, (B,): {C: 1.0}, (B, C): {EOS: 1.0}}
    num_rows = 4000
    model = Babbler([table] * num_rows, DEFAULT, 1)
    torch.manual_seed(0)
    ids = sample_search(model.step, batch_size=num_rows, max_length=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    first = ids[:, 0]
    for token, p in ((A, 0.6), (B, 0.3), (EOS, 0.1)):
        assert (first == token).float().mean().item() == pytest.approx(p, abs=0.03)
    sequences = {strip(row) for row in ids}
    assert sequences == {(A, EOS), (B, C, EOS), (EOS,)}
    assert ids.shape[1] == 3 and bool((ids[first == EOS, 1:] == PAD).all())
    with pytest.raises(ValueError, match="temperature=0"):
        sample_search(
            model.step, batch_size=1, max_length=3, bos_id=BOS, eos_id=EOS, pad_id=PAD, temperature=0
        )
