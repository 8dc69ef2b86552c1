"""Behaviour of model/sampling.py: filters, penalties, greedy, per-row parameters, seeds, statistics."""

import math

import numpy as np
import pytest
import torch

from pcgpt.model.sampling import (
    BatchSampling,
    ErrorDrivenParams,
    ErrorDrivenState,
    error_driven_precision,
    surprise_filter,
    update_mu,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    logprobs,
    make_generator,
    min_p_filter,
    sample_from_logits,
    token_stats,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)

NEG_INF = float("-inf")


def bs_of(*params: SamplingParams) -> BatchSampling:
    return BatchSampling.from_params(list(params), "cpu")


def kept(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------------- top-k


def test_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)  # continuous values: no ties
    ks = torch.tensor([1, 3, 10, 49, 50])
    out = top_k_filter(logits, ks)
    for row, k in enumerate(ks.tolist()):
        keep = kept(out[row])
        assert len(keep) == k
        assert keep == set(torch.topk(logits[row], k).indices.tolist())
        # kept values are untouched
        idx = list(keep)
        assert torch.equal(out[row, idx], logits[row, idx])


def test_top_k_keeps_all_tokens_tied_with_kth():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    out = top_k_filter(logits, torch.tensor([3]))
    # the 3rd largest is 3.0 and three tokens share it: all are kept (5 tokens), nothing below
    assert kept(out[0]) == {0, 1, 2, 3, 4}
    out = top_k_filter(logits, torch.tensor([2]))
    assert kept(out[0]) == {0, 1}


def test_top_k_zero_and_oversized_are_no_ops():
    logits = torch.randn(2, 10)
    out = top_k_filter(logits, torch.tensor([0, 100]))
    assert torch.equal(out, logits)


# ---------------------------------------------------------------------------------------------- top-p


def test_top_p_hand_made_distribution():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05 - 1e-3, 1e-3])
    logits = probs.log().unsqueeze(0).repeat(6, 1)
    ps = torch.tensor([0.4, 0.499, 0.7, 0.85, 0.95, 1.0])
    out = top_p_filter(logits, ps)
    assert kept(out[0]) == {1}  # 0.5 >= 0.4 already: the top token alone
    assert kept(out[1]) == {1}  # just above p
    assert kept(out[2]) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(out[3]) == {1, 3, 2}  # 0.8 < 0.85 -> add 0.1
    assert kept(out[4]) == {1, 3, 2, 0}  # 0.9 < 0.95 -> add 0.05
    assert kept(out[5]) == set(range(6))
    # the top token is kept even for a tiny p
    assert kept(top_p_filter(logits[:1], torch.tensor([1e-6]))[0]) == {1}


def test_top_p_matches_brute_force_on_random_distributions():
    g = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(200):
        V = int(torch.randint(2, 40, (1,), generator=g))
        logits = torch.randn(1, V, generator=g) * float(torch.rand(1, generator=g) * 4 + 0.1)
        p = float(torch.rand(1, generator=g).clamp(min=1e-3))
        probs = torch.softmax(logits.double(), -1)[0].numpy()
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        if np.min(np.abs(cum - p)) < 1e-5:
            continue  # too close to the boundary for a float32 vs float64 comparison to be fair
        # brute force: the smallest prefix of the sorted tokens whose mass reaches p
        n = next(i + 1 for i in range(V) if cum[i] >= p)
        expected = set(order[:n].tolist())
        assert kept(top_p_filter(logits, torch.tensor([p]))[0]) == expected
        checked += 1
    assert checked > 150


def test_top_p_one_keeps_everything_even_minus_inf_free_tail():
    logits = torch.tensor([[30.0, 0.0, -30.0, -60.0]])  # tail probabilities ~1e-13..1e-26
    assert kept(top_p_filter(logits, torch.tensor([1.0]))[0]) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------- min-p


def test_min_p():
    probs = torch.tensor([0.4, 0.2, 0.1999, 0.15, 0.0501])
    logits = probs.log().unsqueeze(0).repeat(4, 1) + 3.0  # an offset must not matter
    out = min_p_filter(logits, torch.tensor([0.0, 0.5, 0.125, 1.0]))
    assert kept(out[0]) == {0, 1, 2, 3, 4}
    assert kept(out[1]) == {0, 1}  # threshold 0.2: 0.2 kept, 0.1999 not
    assert kept(out[2]) == {0, 1, 2, 3, 4}  # threshold 0.05
    assert kept(out[3]) == {0}


def test_min_p_against_probability_formula():
    torch.manual_seed(2)
    logits = torch.randn(8, 30) * 2
    m = torch.rand(8)
    out = min_p_filter(logits, m)
    probs = torch.softmax(logits.double(), -1)
    ref = probs >= m.double().unsqueeze(1) * probs.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(out), ref)


# ---------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_divides_positive_multiplies_negative_seen_only():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 4.0]])
    prompt_mask = torch.tensor([[True, True, False, False, False, False]])
    counts = torch.tensor([[0, 0, 2, 1, 0, 0]])
    bs = bs_of(SamplingParams(repetition_penalty=2.0))
    out = apply_penalties(logits, prompt_mask, counts, bs)
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.5, -2.0, 0.5, 4.0]]))
    # without a prompt mask only the output tokens count as seen
    out = apply_penalties(logits, None, counts, bs)
    assert torch.allclose(out, torch.tensor([[2.0, -2.0, 1.5, -2.0, 0.5, 4.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 4.0]]))  # input untouched


def test_presence_and_frequency_penalties_formula():
    torch.manual_seed(3)
    logits = torch.randn(3, 12)
    counts = torch.randint(0, 4, (3, 12))
    prompt_mask = torch.rand(3, 12) > 0.5  # must not affect presence/frequency
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.0),
        SamplingParams(presence_penalty=0.0, frequency_penalty=0.3),
        SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0),
    ]
    out = apply_penalties(logits, prompt_mask, counts, bs_of(*params))
    for i, p in enumerate(params):
        c = counts[i].float()
        ref = logits[i] - p.presence_penalty * (c > 0).float() - p.frequency_penalty * c
        assert torch.allclose(out[i], ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------- temperature


def test_apply_temperature_leaves_zero_rows_unscaled():
    logits = torch.randn(3, 5)
    out = apply_temperature(logits, torch.tensor([0.0, 0.5, 2.0]))
    assert torch.equal(out[0], logits[0])
    assert torch.allclose(out[1], logits[1] * 2)
    assert torch.allclose(out[2], logits[2] / 2)


def test_temperature_zero_is_argmax():
    torch.manual_seed(4)
    logits = torch.randn(16, 100)
    params = [SamplingParams(temperature=0.0, top_k=i % 3, top_p=0.5 + 0.03 * i, seed=(i if i % 2 else None))
              for i in range(16)]
    tokens = sample_from_logits(logits, bs_of(*params), [make_generator(p.seed, "cpu") for p in params])
    assert torch.equal(tokens, logits.argmax(-1))
    # greedy rows mixed with sampled rows
    params[3] = SamplingParams(temperature=1.0)
    tokens = sample_from_logits(logits, bs_of(*params), [None] * 16)
    mask = torch.tensor([p.temperature == 0 for p in params])
    assert torch.equal(tokens[mask], logits.argmax(-1)[mask])


# ---------------------------------------------------------------------------------------------- per-row parameters

MIXED = [
    SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3, seed=11),
    SamplingParams(temperature=1.3, top_p=0.6, presence_penalty=0.5, seed=12),
    SamplingParams(temperature=0.0, min_p=0.3, frequency_penalty=1.0),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, seed=13),
    SamplingParams(temperature=2.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=-0.2, seed=14),
]


def test_per_row_parameters_equal_each_row_alone():
    torch.manual_seed(5)
    B, V = len(MIXED), 64
    logits = torch.randn(B, V) * 3
    prompt_mask = torch.rand(B, V) > 0.8
    counts = torch.randint(0, 3, (B, V)) * (torch.rand(B, V) > 0.7)
    bs = bs_of(*MIXED)
    batched = {
        "pen": apply_penalties(logits, prompt_mask, counts, bs),
        "temp": apply_temperature(logits, bs.temperature),
        "top_k": top_k_filter(logits, bs.top_k),
        "top_p": top_p_filter(logits, bs.top_p),
        "min_p": min_p_filter(logits, bs.min_p),
    }
    tokens = sample_from_logits(logits, bs, [make_generator(p.seed, "cpu") for p in MIXED])
    for i, p in enumerate(MIXED):
        one = bs_of(p)
        row = logits[i : i + 1]
        assert torch.equal(batched["pen"][i : i + 1], apply_penalties(row, prompt_mask[i : i + 1], counts[i : i + 1], one))
        assert torch.equal(batched["temp"][i : i + 1], apply_temperature(row, one.temperature))
        assert torch.equal(batched["top_k"][i : i + 1], top_k_filter(row, one.top_k))
        assert torch.equal(batched["top_p"][i : i + 1], top_p_filter(row, one.top_p))
        assert torch.equal(batched["min_p"][i : i + 1], min_p_filter(row, one.min_p))
        if p.seed is not None or p.temperature == 0:
            alone = sample_from_logits(row, one, [make_generator(p.seed, "cpu")])
            assert tokens[i] == alone[0]


def test_sampled_tokens_respect_filters():
    torch.manual_seed(6)
    logits = torch.randn(len(MIXED), 64) * 3
    bs = bs_of(*MIXED)
    allowed = min_p_filter(top_p_filter(top_k_filter(apply_temperature(logits, bs.temperature), bs.top_k), bs.top_p), bs.min_p)
    for _ in range(50):
        tokens = sample_from_logits(logits, bs, [None] * len(MIXED))
        assert torch.isfinite(allowed.gather(1, tokens.unsqueeze(1))).all()


# ---------------------------------------------------------------------------------------------- seeds


def _generate(rows: list[SamplingParams], W: torch.Tensor, steps: int) -> torch.Tensor:
    """A toy decode loop: next logits are a fixed function of the previous token (a bigram table),
    with penalties over each row's output, so a row's whole trajectory depends on its own draws."""
    B, V = len(rows), W.shape[0]
    bs = bs_of(*rows)
    gens = [make_generator(p.seed, "cpu") for p in rows]
    prev = torch.zeros(B, dtype=torch.long)
    counts = torch.zeros(B, V, dtype=torch.long)
    out = []
    for _ in range(steps):
        logits = apply_penalties(W[prev], None, counts, bs)
        prev = sample_from_logits(logits, bs, gens)
        counts[torch.arange(B), prev] += 1
        out.append(prev)
    return torch.stack(out, 1)


def test_same_seed_same_sequence_and_batch_independent():
    W = torch.randn(50, 50, generator=torch.Generator().manual_seed(7)) * 2
    me = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, frequency_penalty=0.3, seed=1234)
    alone = _generate([me], W, 40)[0]
    assert torch.equal(alone, _generate([me], W, 40)[0])
    other_seed = _generate([SamplingParams(temperature=0.9, top_k=20, top_p=0.95, frequency_penalty=0.3, seed=1235)], W, 40)[0]
    assert not torch.equal(alone, other_seed)
    # batched with unseeded, greedy and other seeded rows, in different positions
    torch.manual_seed(99)
    batch = _generate([SamplingParams(temperature=1.5), me, SamplingParams(temperature=0.0),
                       SamplingParams(top_p=0.5, seed=5)], W, 40)
    assert torch.equal(batch[1], alone)
    batch = _generate([SamplingParams(min_p=0.1, seed=1234 + 1), SamplingParams(temperature=1.0), me], W, 40)
    assert torch.equal(batch[2], alone)


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a = torch.rand(3, generator=make_generator(-5, "cpu"))
    b = torch.rand(3, generator=make_generator(-5, "cpu"))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- distribution

# chi-square 0.999 quantile with 7 degrees of freedom (8 categories): a correct sampler fails ~1 in 1000
CHI2_999_DOF7 = 24.32


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    n = tokens.numel()
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    return float(((observed - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    probs = torch.softmax(logits, -1)
    N = 20000
    torch.manual_seed(8)
    tokens = sample_from_logits(logits.repeat(N, 1), bs_of(*[SamplingParams()] * N), [None] * N)
    assert _chi2(tokens, probs) < CHI2_999_DOF7
    # the seeded path: one generator per row
    N = 4000
    gens = [make_generator(10_000 + i, "cpu") for i in range(N)]
    tokens = sample_from_logits(logits.repeat(N, 1), bs_of(*[SamplingParams()] * N), gens)
    assert _chi2(tokens, probs) < CHI2_999_DOF7


def test_temperature_changes_distribution_as_softmax_of_scaled_logits():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    probs = torch.softmax(logits / 2.0, -1)
    N = 20000
    torch.manual_seed(9)
    tokens = sample_from_logits(logits.repeat(N, 1), bs_of(*[SamplingParams(temperature=2.0)] * N), [None] * N)
    assert _chi2(tokens, probs) < CHI2_999_DOF7


def test_low_precision_logits():
    logits = torch.randn(4, 100).to(torch.bfloat16)
    bs = bs_of(*[SamplingParams(temperature=0.8, top_k=10, top_p=0.9)] * 4)
    tokens = sample_from_logits(logits, bs, [make_generator(1, "cpu")] * 4)
    assert tokens.dtype == torch.long and tokens.shape == (4,)


# ---------------------------------------------------------------------------------------------- statistics


def _np_stats(logits: np.ndarray, chosen: np.ndarray):
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    info = np.where(p > 0, -lp / np.log(2), 0.0)
    H = (p * info).sum(-1)
    VH = (p * (info - H[:, None]) ** 2 * (p > 0)).sum(-1)
    chosen_lp = lp[np.arange(len(chosen)), chosen]
    return chosen_lp, -chosen_lp / np.log(2), H, VH


def test_token_stats_against_numpy():
    torch.manual_seed(10)
    logits = torch.randn(6, 40) * torch.tensor([0.1, 1, 2, 4, 8, 16]).unsqueeze(1)
    chosen = torch.randint(0, 40, (6,))
    s = token_stats(logits, chosen)
    ref = _np_stats(logits.double().numpy(), chosen.numpy())
    for name, r in zip(["logprob", "surprise", "entropy", "varentropy"], ref):
        assert s[name].dtype == torch.float32 and s[name].shape == (6,)
        np.testing.assert_allclose(s[name].numpy(), r, rtol=1e-4, atol=1e-4)
    # uniform over V: entropy log2 V, varentropy 0
    u = token_stats(torch.zeros(1, 16), torch.tensor([3]))
    assert abs(float(u["entropy"]) - 4.0) < 1e-5 and abs(float(u["varentropy"])) < 1e-5
    assert abs(float(u["surprise"]) - 4.0) < 1e-5


def test_token_stats_finite_with_minus_inf_logits():
    logits = torch.tensor([[0.0, NEG_INF, 1.0, NEG_INF], [NEG_INF, NEG_INF, 5.0, NEG_INF]])
    s = token_stats(logits, torch.tensor([2, 2]))
    for v in s.values():
        assert torch.isfinite(v).all()
    # two live tokens: matches the distribution over those two alone
    ref = token_stats(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    for k in s:
        assert torch.allclose(s[k][0], ref[k][0], atol=1e-6)
    assert float(s["entropy"][1]) == 0.0 and float(s["varentropy"][1]) == 0.0 and float(s["surprise"][1]) == 0.0


def test_logprobs_and_top_logprobs():
    torch.manual_seed(11)
    logits = torch.randn(3, 20).to(torch.bfloat16)
    lp = logprobs(logits)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3))
    values, ids = top_logprobs(logits, 5)
    assert values.shape == (3, 5) and ids.shape == (3, 5) and ids.dtype == torch.long
    assert torch.equal(values, lp.gather(1, ids))
    assert torch.equal(values, torch.topk(lp, 5).values)
    assert top_logprobs(logits, 100)[0].shape == (3, 20)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=100.5),
        dict(temperature=math.inf),
        dict(temperature=math.nan),
        dict(top_p=0.0),
        dict(top_p=1.1),
        dict(top_p=math.nan),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(repetition_penalty=math.inf),
        dict(repetition_penalty=math.nan),
        dict(presence_penalty=2.5),
        dict(presence_penalty=-2.5),
        dict(frequency_penalty=2.01),
        dict(frequency_penalty=-3.0),
        dict(seed="42"),
    ],
)
def test_validate_rejects_bad_values(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad).validate()
    with pytest.raises(ValueError):
        BatchSampling.from_params([SamplingParams(), SamplingParams(**bad)], "cpu")


def test_validate_accepts_edges():
    for ok in [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=100.0, top_k=1, top_p=1e-9, min_p=1.0, repetition_penalty=1e-3,
                       presence_penalty=-2.0, frequency_penalty=2.0, seed=-7),
    ]:
        ok.validate()


# ---------------------------------------------------------------------------------------------- error-driven state


def test_error_driven_state_equals_the_functions_on_its_rows_and_leaves_other_rows_alone():
    """ErrorDrivenState over per-slot tensors: rows of slots that use the sampler get exactly what
    error_driven_precision / surprise_filter / update_mu give them one by one (the first step
    without m0 takes its reference from the prediction itself); other rows pass through, and
    only the used slots' μ and m move."""
    torch.manual_seed(0)
    V, n_slots = 40, 6
    state = ErrorDrivenState(n_slots, "cpu")
    params = {1: ErrorDrivenParams(tau=2.0, eta=0.2, lam=0.7, base_temperature=0.9),
              4: ErrorDrivenParams(tau=3.0, mu0=5.0, m0=0.3)}
    slots = torch.tensor(sorted(params))
    state.admit(slots, torch.tensor([ErrorDrivenState.initial_row(params[s]) for s in sorted(params)]))
    state.admit(torch.tensor([0]), torch.tensor([ErrorDrivenState.initial_row(None)]))
    mu = {1: 4.0, 4: 5.0}
    log_mean = {1: None, 4: 0.3}
    for step in range(3):
        raw = torch.randn(n_slots, V) * 2
        temperature = torch.full((n_slots,), 0.7)
        x, t, info = state.apply(raw, raw.clone(), temperature, slice(0, n_slots))
        chosen = torch.randint(0, V, (n_slots,))
        for s in range(n_slots):
            if s not in params:
                assert torch.equal(x[s], raw[s]) and t[s] == 0.7
                continue
            p = params[s]
            lp = torch.log_softmax(raw[s:s + 1], -1)
            entropy = -(lp.exp() * lp).sum(-1) / math.log(2)
            m = torch.log(entropy) if log_mean[s] is None else torch.tensor([log_mean[s]])
            precision, new_mean = error_driven_precision(entropy, m, torch.tensor([p.lam]))
            want_t = p.base_temperature / precision
            filtered, n_kept = surprise_filter(raw[s:s + 1], want_t, torch.tensor([mu[s]]))
            torch.testing.assert_close(t[s:s + 1], want_t, rtol=1e-6, atol=0)
            assert torch.equal(torch.isfinite(x[s:s + 1]), torch.isfinite(filtered)) and info["n_kept"][s] == n_kept
            assert info["mu"][s] == pytest.approx(mu[s])
            mu[s] = float(update_mu(torch.tensor([mu[s]]), filtered, want_t, chosen[s:s + 1], torch.tensor([p.tau]),
                                    torch.tensor([p.eta]))[0])
            log_mean[s] = float(new_mean[0])
        before = state.values.clone()
        state.update(info, x, t, chosen, slice(0, n_slots))
        for s in range(n_slots):
            if s in params:
                assert state.values[s, 5].item() == pytest.approx(mu[s], rel=1e-5)
                assert state.values[s, 6].item() == pytest.approx(log_mean[s], rel=1e-5)
            else:
                assert torch.equal(state.values[s], before[s])
