"""Batched greedy search, sampling and beam search over any step function (torch only).

A model supplies ``step(last_ids_N, position) -> log_probs_NV`` (one decoder step for N rows, the
input token at ``position``; the model keeps its own key/value cache) and, for beam search,
``reorder(index_N)`` (row n of the cache becomes old row ``index_N[n]``).

**Same number of steps on every rank.** Under DeepSpeed ZeRO-3 every decoder step gathers the
decoder's parameters with collectives, so a rank that stops early leaves the others waiting for
ever. After each step the search calls ``all_finished(local_done) -> bool`` and stops only when it
returns True. The default is local (a single process); a distributed caller passes a reduction over
ranks (``xray_pretrain.collectives.all_ranks_true``), and ``lambda done: False`` runs a fixed
``max_length - 1`` steps with no collective at all. Rows that have finished keep being fed
``<pad>`` and their outputs are ignored.

:func:`sample_search` draws each token from the model's distribution instead (self-critical
training); it stops the same way.

Conventions: ``max_length`` counts every id including ``<bos>`` (as the tokenizer's), so at most
``max_length - 1`` ids are generated; results hold the generated ids after ``<bos>``: words,
``<eos>``, then ``<pad>``; ``<pad>`` and ``<bos>`` are never generated. Trigram blocking forbids a token that would repeat a trigram already in
the hypothesis. The length penalty (fairseq's): hypotheses are ranked by
``sum log p / num_generated ** length_penalty`` (``0``: plain log-probability, R2Gen's default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

StepFn = Callable[[torch.Tensor, int], torch.Tensor]


def _local(done: bool) -> bool:
    return done


def ban_repeated_trigrams(tokens_NT: torch.Tensor, log_probs_NV: torch.Tensor) -> None:
    """In place: -inf for every token that would complete a trigram already in its row."""
    if tokens_NT.shape[1] < 3:
        return
    # (t_i, t_i+1) equal to the last two tokens -> t_i+2 would repeat the trigram starting at i.
    match_NI = (tokens_NT[:, :-2] == tokens_NT[:, -2:-1]) & (tokens_NT[:, 1:-1] == tokens_NT[:, -1:])
    hits_NV = torch.zeros_like(log_probs_NV).scatter_add_(
        1, tokens_NT[:, 2:], match_NI.to(log_probs_NV.dtype)
    )
    log_probs_NV.masked_fill_(hits_NV > 0, float("-inf"))


def _one_token_at_a_time(
    step: StepFn,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    all_finished: Callable[[bool], bool] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """The loop greedy search and sampling share: ``choose(tokens_BT, log_probs_BV) -> next_B`` picks
    each row's next token (``<pad>`` and ``<bos>`` already at -inf); finished rows get ``<pad>``."""
    all_finished = all_finished or _local
    tokens_BT = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    done_B = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for position in range(max_length - 1):
        log_probs_BV = step(tokens_BT[:, -1], position)
        log_probs_BV[:, [pad_id, bos_id]] = float("-inf")  # never generated (an untrained model may try)
        next_B = choose(tokens_BT, log_probs_BV).masked_fill(done_B, pad_id)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        done_B |= next_B == eos_id
        if all_finished(bool(done_B.all())):
            break
    return tokens_BT[:, 1:]


def greedy_search(
    step: StepFn,
    *,
    batch_size: int,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    block_trigrams: bool = False,
    all_finished: Callable[[bool], bool] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The most likely next token at every step -> (B, T <= max_length - 1) generated ids."""

    def most_likely(tokens_BT: torch.Tensor, log_probs_BV: torch.Tensor) -> torch.Tensor:
        if block_trigrams:
            ban_repeated_trigrams(tokens_BT, log_probs_BV)
        return log_probs_BV.argmax(-1)

    return _one_token_at_a_time(
        step, most_likely, batch_size=batch_size, max_length=max_length, bos_id=bos_id, eos_id=eos_id,
        pad_id=pad_id, all_finished=all_finished, device=device,
    )  # fmt: skip


def sample_search(
    step: StepFn,
    *,
    batch_size: int,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    all_finished: Callable[[bool], bool] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Each next token drawn from ``softmax(log_probs / temperature)`` (torch's global RNG) -> (B, T <=
    max_length - 1) generated ids, as :func:`greedy_search` returns them. Self-critical training's
    exploration; no trigram blocking (the samples must come from the model's own distribution)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy_search is the zero limit)")

    def drawn(_tokens_BT: torch.Tensor, log_probs_BV: torch.Tensor) -> torch.Tensor:
        return torch.multinomial((log_probs_BV / temperature).softmax(-1), 1)[:, 0]

    return _one_token_at_a_time(
        step, drawn, batch_size=batch_size, max_length=max_length, bos_id=bos_id, eos_id=eos_id,
        pad_id=pad_id, all_finished=all_finished, device=device,
    )  # fmt: skip


@dataclass
class BeamResult:
    ids_BT: torch.Tensor  # (B, T) the best hypothesis per sample, generated ids after <bos>
    log_prob_B: torch.Tensor  # its total log-probability
    score_B: torch.Tensor  # its ranking score (log-probability / length ** length_penalty)


def beam_search(
    step: StepFn,
    reorder: Callable[[torch.Tensor], None],
    *,
    batch_size: int,
    beam_size: int,
    max_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.0,
    block_trigrams: bool = True,
    all_finished: Callable[[bool], bool] | None = None,
    device: torch.device | str = "cpu",
) -> BeamResult:
    """Batched beam search; rows are ``sample * beam_size + beam`` (the step function sees B*K rows).

    A finished hypothesis stays in its beam and competes with the unfinished ones by its score. With
    ``length_penalty == 0`` a sample is done when its best hypothesis has ended (log-probabilities
    only fall, so nothing can overtake it); otherwise when all its hypotheses have ended.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    all_finished = all_finished or _local
    B, K = batch_size, beam_size
    tokens_NT = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    log_prob_BK = torch.zeros(B, K, device=device)
    log_prob_BK[:, 1:] = float("-inf")  # all beams start equal: expand the first only
    length_BK = torch.zeros(B, K, device=device)
    finished_BK = torch.zeros(B, K, dtype=torch.bool, device=device)
    score_BK = log_prob_BK.clone()
    first_row_B = torch.arange(B, device=device)[:, None] * K
    for position in range(max_length - 1):
        log_probs_NV = step(tokens_NT[:, -1], position).float()
        V = log_probs_NV.shape[-1]
        log_probs_NV[:, [pad_id, bos_id]] = float("-inf")  # never generated
        if block_trigrams:
            ban_repeated_trigrams(tokens_NT, log_probs_NV)
        # A finished hypothesis continues only with <pad>, at no cost and no added length.
        finished_N = finished_BK.flatten()
        log_probs_NV[finished_N] = float("-inf")
        log_probs_NV[finished_N, pad_id] = 0.0
        candidate_BKV = log_prob_BK[..., None] + log_probs_NV.view(B, K, V)
        length_BKV = (length_BK + (~finished_BK).float())[..., None].expand(B, K, V)
        rank_BKV = candidate_BKV / length_BKV.clamp_min(1) ** length_penalty
        score_BK, flat_BK = rank_BKV.reshape(B, K * V).topk(K, dim=1)
        beam_BK, token_BK = flat_BK // V, flat_BK % V
        log_prob_BK = candidate_BKV.reshape(B, K * V).gather(1, flat_BK)
        length_BK = length_BKV.reshape(B, K * V).gather(1, flat_BK)
        index_N = (first_row_B + beam_BK).flatten()
        tokens_NT = torch.cat([tokens_NT.index_select(0, index_N), token_BK.reshape(-1, 1)], dim=1)
        finished_BK = finished_BK.flatten().index_select(0, index_N).view(B, K) | (token_BK == eos_id)
        reorder(index_N)
        done_B = finished_BK[:, 0] if length_penalty == 0 else finished_BK.all(1)
        if all_finished(bool(done_B.all())):
            break
    best_N = first_row_B[:, 0]  # top-k keeps beams sorted: beam 0 ranks first
    return BeamResult(tokens_NT[best_N, 1:], log_prob_BK[:, 0], score_BK[:, 0])
