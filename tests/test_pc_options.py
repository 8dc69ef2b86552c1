"""The mathematics of the PC model's options (model/pc.py; docs/pc.md states them): the error laws
(Laplace, Student-t with learned ν), errors in LayerNorm units, precision-weighted attention,
local learning under each, and adaptive settling.

Each energy is written out here again, from its statement, independently of PCGPT.energy; the
settling step must be the preconditioned gradient of that energy. Tiny models in fp64 (the
comparisons are of one computation by two routes, so their tolerances are near fp64's rounding).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pcgpt.model.checkpoint import CheckpointError, load_checkpoint, save_pcgpt
from pcgpt.model.generate import decode_step, kv_len_bucket
from pcgpt.model.pc import LAPLACE_EPS, PCGPT, PastAttention, PCConfig, entropy_bits
from pcgpt.model.tokenizer import CharTokenizer
from test_pc import cached, make_models, parallel_inputs, tokens

OPTIONS = {
    "laplace": dict(error_law="laplace"),
    "student_t": dict(error_law="student_t"),
    "ln_precision": dict(ln_precision=True),
    "attention_precision": dict(attention_precision=True),
    "student_t+ln": dict(error_law="student_t", ln_precision=True),
}


def option_models(options, dtype=torch.float64, seed=0):
    """(the baseline GPT this PC model computes at T = 0, the PC model with `options`): the
    generators and precisions of test_pc.make_models, ν_l spread over 2..8, head precisions
    random (the T = 0 baseline then has them folded into its value weights)."""
    gpt, pc0 = make_models(seed=seed, dtype=dtype)
    pc = PCGPT.from_baseline(gpt, **options).to(dtype).eval()
    missing, _ = pc.load_state_dict(pc0.state_dict(), strict=False)
    assert all(k.startswith("log_nu") or k.endswith("head_log_precision") for k in missing)
    with torch.no_grad():
        if pc.config.error_law == "student_t":
            pc.log_nu.copy_(torch.linspace(math.log(2.0), math.log(8.0), pc.config.n_layer))
        if pc.config.attention_precision:
            g = torch.Generator().manual_seed(seed + 7)
            for block in pc.transformer.h:
                block.attn.head_log_precision.copy_(0.7 * torch.randn(pc.config.n_head, generator=g))
            gpt = fold_head_precisions(gpt, pc)
    return gpt, pc


def fold_head_precisions(gpt, pc):
    """A plain GPT computing what pc's precision-weighted attention computes: each head's value
    weights scaled by its weight H·π_h/Σπ."""
    import copy
    folded = copy.deepcopy(gpt)
    C, H = pc.config.n_embd, pc.config.n_head
    with torch.no_grad():
        for block, src in zip(folded.transformer.h, pc.transformer.h):
            w = (H * torch.softmax(src.attn.head_log_precision, 0)).repeat_interleave(C // H)
            block.attn.c_attn.weight[2 * C:] *= w[:, None]
            if block.attn.c_attn.bias is not None:
                block.attn.c_attn.bias[2 * C:] *= w
    return folded


def stated_scales(z0, zs):
    """1/σ̄ of each state over its channels, LayerNorm's (ε = 1e-5), of the states given."""
    return [torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5) for z in [z0, *zs]]


def law_energy(e, precision, law, nu):
    """Σ over channels of one error term's energy, as docs/pc.md states it."""
    if law == "gaussian":
        return 0.5 * precision * (e * e).sum(-1)
    if law == "laplace":
        return precision ** 0.5 * (torch.sqrt(e * e + LAPLACE_EPS ** 2) - LAPLACE_EPS).sum(-1)
    return 0.5 * (nu + 1) * torch.log(1 + precision * e * e / nu).sum(-1)


def stated_energy(pc, z0, zs, pasts, mask, scales=None):
    """E = Σ_l ρ(s_l·(z_l − f_l(z_{l−1})); π = 1) + ρ(s_{l−1}·(z_{l−1} − g_l(z_l)); κ_l), per position."""
    law = pc.config.error_law
    kappa = [float(k) for k in pc.kappa().detach()]
    nu = [float(v) for v in pc.nu().detach()] if law == "student_t" else [None] * len(zs)
    E, below = 0.0, z0
    for l, (block, gen) in enumerate(zip(pc.transformer.h, pc.generators)):
        up = zs[l] - block(below, PastAttention(*pasts[l], mask))
        down = below - gen(zs[l])
        if scales is not None:
            up, down = up * scales[l + 1], down * scales[l]
        E = E + law_energy(up, 1.0, law, nu[l]) + law_energy(down, kappa[l], law, nu[l])
        below = zs[l]
    return E


def stated_preconditioner(pc, scales=None):
    """D_l per layer: the curvature at zero error of each term on z_l, Jacobians as the identity:
    π s_l² + κ_l s_{l−1}² + κ_{l+1} s_l² + π s_{l+1}², with π, κ times (ν+1)/ν under Student-t."""
    L = pc.config.n_layer
    kappa = [float(k) for k in pc.kappa().detach()]
    c = [(float(v) + 1) / float(v) for v in pc.nu().detach()] if pc.config.error_law == "student_t" else [1.0] * L
    s2 = [1.0] * (L + 1) if scales is None else [s * s for s in scales]
    D = []
    for l in range(L):
        d = c[l] * s2[l + 1] + c[l] * kappa[l] * s2[l]
        if l + 1 < L:
            d = d + c[l + 1] * kappa[l + 1] * s2[l + 1] + c[l + 1] * s2[l + 2]
        D.append(d)
    return D


# --- the settling step is the preconditioned gradient of the stated energy ------------------------------

@pytest.mark.parametrize("name", OPTIONS)
def test_settling_step_is_the_preconditioned_gradient_of_the_stated_energy(name):
    _, pc = option_models(OPTIONS[name])
    idx = tokens(2, 8)
    alpha = 0.01
    with torch.no_grad():
        z0, ff, pasts, mask = parallel_inputs(pc, idx)
    scales = stated_scales(z0, ff) if pc.config.ln_precision else None  # σ̄ of the amortised states
    # away from the feed-forward states, so that every error term (the laws' bottom-up ones too) is non-zero
    start = [z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(l), dtype=z.dtype)
             for l, z in enumerate(ff)]
    free = [z.clone().requires_grad_(True) for z in start]
    grads = torch.autograd.grad(stated_energy(pc, z0, free, pasts, mask, scales).sum(), free)
    D = stated_preconditioner(pc, scales)
    model_scales = pc.state_scales(z0, ff) if pc.config.ln_precision else None
    new, info = pc.settle(z0, start, pasts, mask, torch.ones(2, dtype=torch.long), alpha, from_feedforward=False,
                          scales=model_scales)
    assert int(info["rejected"].sum()) == 0 and torch.all(info["steps"] == 1)
    torch.testing.assert_close(info["energy0"], stated_energy(pc, z0, start, pasts, mask, scales).detach(),
                               rtol=1e-10, atol=1e-10)
    for l, (zn, z, g) in enumerate(zip(new, start, grads)):
        assert g.abs().max() > 1e-3  # not a vacuous comparison
        torch.testing.assert_close(zn - z, -alpha * g / D[l], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", OPTIONS)
def test_feedforward_start_equals_the_full_autograd_start(name):
    """From the feed-forward states (bottom-up errors zero) the first step's gradient comes from the
    generators alone: the same settling as the full autograd start, under every option."""
    _, pc = option_models(OPTIONS[name])
    idx = tokens(2, 9)
    z0, zs, pasts, mask = parallel_inputs(pc, idx)
    steps = torch.full((2,), 3)
    fast, fast_info = pc.settle(z0, zs, pasts, mask, steps, 0.02)
    full, full_info = pc.settle(z0, zs, pasts, mask, steps, 0.02, from_feedforward=False)
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fast_info["energy"], full_info["energy"], rtol=1e-7, atol=1e-9)
    assert torch.all(fast_info["energy"] < fast_info["energy0"])


# --- T = 0 is the baseline ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIONS)
@torch.no_grad()
def test_zero_steps_equal_the_baseline_parallel_and_cached(name):
    gpt, pc = option_models(OPTIONS[name])
    idx = tokens(2, 10)
    base = gpt(idx)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    close(pc.settled_forward(idx, settle_steps=0)[0], base)
    cache = pc.new_cache(2)
    logits, stats = cached(pc, idx[:, :7], torch.arange(7)[None].expand(2, 7), cache, [1, 0], settle_steps=0,
                           last_only=False)
    close(logits, base[:, :7])
    order = torch.tensor([1, 0])
    for p in range(7, 10):
        logits, stats = decode_step(pc, idx[order, p], torch.full((2,), p), cache, torch.zeros(2, dtype=torch.long),
                                    kv_len=kv_len_bucket(p + 1, cache.max_len), max_settle_steps=0)
        close(logits, base[order, p])
        assert int(stats["steps"].sum()) == 0
    # and settling does move the logits (with a step Laplace's non-smooth energy accepts)
    pc.config.alpha = 0.02
    assert (pc.settled_forward(idx, settle_steps=2)[0] - base).abs().max() > 1e-4


# --- the energy never rises ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIONS)
@torch.no_grad()
def test_energy_never_rises_with_backtracking(name):
    _, pc = option_models(OPTIONS[name])
    idx = tokens(2, 9)
    z0, zs, pasts, mask = parallel_inputs(pc, idx)
    scales = stated_scales(z0, zs) if pc.config.ln_precision else None
    rejected = 0
    for alpha in (0.02, 50.0):
        previous = None
        for T in (1, 2, 4, 6):
            settled, info = pc.settle(z0, zs, pasts, mask, torch.full((2,), T), alpha)
            assert torch.all(info["energy"] <= info["energy0"])
            if previous is not None:
                assert torch.all(info["energy"] <= previous)
            previous = info["energy"]
            # what settling reports is the stated energy of the states it returns
            torch.testing.assert_close(info["energy"], stated_energy(pc, z0, settled, pasts, mask, scales),
                                       rtol=1e-9, atol=1e-9)
            rejected += int(info["rejected"].sum())
        if alpha < 1:  # a small step lowers the energy everywhere
            assert torch.all(info["energy"] < info["energy0"])
    assert rejected > 0  # the large step overshoots: backtracking had to act


# --- the laws' energies are negative log-likelihoods ------------------------------------------------------

@pytest.mark.parametrize("law", ["gaussian", "laplace", "student_t"])
def test_energy_plus_normaliser_is_the_negative_log_likelihood_of_the_law(law):
    """The free energy that trains κ and ν is E + nll_normaliser: up to a constant, −log p of every
    error under the law (torch.distributions), so its minimum over κ, ν is their likelihood's."""
    _, pc = option_models({"error_law": law})
    idx = tokens(2, 6)
    z0, zs, pasts, mask = parallel_inputs(pc, idx)
    zs = [z + 0.1 * torch.randn_like(z) for z in zs]
    E, _, _ = pc.energy(z0, zs, pasts, mask, pc.kappa())
    nll = E + pc.nll_normaliser(pc.kappa())
    below, expected = z0, 0.0
    kappa = pc.kappa()
    for l, (block, gen) in enumerate(zip(pc.transformer.h, pc.generators)):
        up = zs[l] - block(below, PastAttention(*pasts[l], mask))
        down = below - gen(zs[l])
        for e, prec in ((up, torch.ones(())), (down, kappa[l])):
            scale = prec.rsqrt()
            if law == "gaussian":
                dist = torch.distributions.Normal(0.0, scale)
            elif law == "laplace":  # Laplace of scale 1/√κ; E smooths |e| within ε
                dist = torch.distributions.Laplace(0.0, scale)
            else:
                dist = torch.distributions.StudentT(pc.nu()[l], 0.0, scale)
            expected = expected - dist.log_prob(e).sum(-1)
        below = zs[l]
    d, L = pc.config.n_embd, pc.config.n_layer
    constant = {"gaussian": L * d * math.log(2 * math.pi), "laplace": 2 * L * d * math.log(2), "student_t": 0.0}[law]
    tol = 2 * L * d * LAPLACE_EPS * max(1.0, float(kappa.max().detach()) ** 0.5) if law == "laplace" else 1e-9
    torch.testing.assert_close(nll + constant, expected, rtol=0, atol=tol)
    # and the gradients the precisions learn from are the likelihood's
    g_nll = torch.autograd.grad(nll.sum(), [p for p in pc.slow_parameters()], retain_graph=True)
    g_exp = torch.autograd.grad(expected.sum(), [p for p in pc.slow_parameters()])
    for a, b in zip(g_nll, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-6 if law != "laplace" else 0.05, atol=1e-8 if law != "laplace" else tol)


def test_student_t_with_many_degrees_of_freedom_is_the_gaussian():
    _, t = option_models({"error_law": "student_t"})
    _, g = option_models({})
    with torch.no_grad():
        t.log_nu.fill_(math.log(1e7))
    idx = tokens(2, 6)
    z0, zs, pasts, mask = parallel_inputs(g, idx)
    zs = [z + 0.1 * torch.randn_like(z) for z in zs]
    torch.testing.assert_close(t.energy(z0, zs, pasts, mask, t.kappa())[0], g.energy(z0, zs, pasts, mask, g.kappa())[0],
                               rtol=1e-5, atol=1e-8)


# --- local learning: each part learns from its own layer's errors only --------------------------------------

@pytest.mark.parametrize("name", ["laplace", "student_t+ln", "attention_precision"])
def test_local_learning_gradients_stay_in_their_layer(name):
    _, pc = option_models(OPTIONS[name])
    law, L, d = pc.config.error_law, pc.config.n_layer, pc.config.n_embd
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    k_max, alpha = 3, 0.02
    # the whole local-learning loss, as training computes it
    total, _ = pc.loss(idx, targets, learning="local", k_max=k_max, alpha=alpha)
    params = dict(pc.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)))
    # the states it settled to (deterministic: the same settling, with the targets clamped)
    with torch.no_grad():
        zs = pc.feedforward(idx)
        pasts, mask = pc.parallel_context(zs)
        scales = pc.state_scales(zs[0], zs[1:]) if pc.config.ln_precision else None
        settled, info = pc.settle(zs[0], zs[1:], pasts, mask, torch.full((2,), k_max), alpha, targets=targets,
                                  scales=scales)
        assert torch.all(info["energy"] < info["energy0"])  # the clamped output moved the hidden states
        states = [zs[0]] + settled
    s = None if scales is None else [scales[..., l, None] for l in range(L + 1)]
    kappa = pc.kappa()
    nu = pc.nu() if law == "student_t" else [None] * L
    for l in range(L):
        # layer l's own terms, stated here: its bottom-up and top-down errors' NLL per unit
        block, gen = pc.transformer.h[l], pc.generators[l]
        up = states[l + 1] - block(states[l], PastAttention(*pasts[l], mask))
        down = states[l] - gen(states[l + 1])
        if s is not None:
            up, down = up * s[l + 1], down * s[l]
        own = (law_energy(up, 1.0, law, None if nu[l] is None else nu[l]).mean()
               + law_energy(down, kappa[l], law, None if nu[l] is None else nu[l]).mean()
               - 0.5 * d * torch.log(kappa[l])) / d
        if law == "student_t":
            n = nu[l]
            own = own + 2 * (torch.lgamma(n / 2) - torch.lgamma((n + 1) / 2) + 0.5 * torch.log(n * math.pi))
        mine = [n for n in params if n.startswith((f"transformer.h.{l}.", f"generators.{l}."))]
        expected = torch.autograd.grad(own, [params[n] for n in mine], allow_unused=True, retain_graph=True)
        for n, e in zip(mine, expected):
            assert e is not None and grads[n] is not None, n
            torch.testing.assert_close(grads[n], e, rtol=1e-9, atol=1e-12)
        assert any(grads[n].abs().max() > 0 for n in mine)
        for shared in ("rho", "log_nu"):  # one entry per layer: layer l's is its own terms' gradient
            if shared in params:
                (e,) = torch.autograd.grad(own, params[shared], retain_graph=True)
                torch.testing.assert_close(grads[shared][l], e[l], rtol=1e-9, atol=1e-12)
                assert torch.all(e[torch.arange(L) != l] == 0) and e[l] != 0
    # the readout learns from its CE only; the embeddings from nothing but the readout's tied weights
    ce = F.cross_entropy(pc.head(states[-1]).flatten(0, 1), targets.flatten())
    (g,) = torch.autograd.grad(ce, params["transformer.ln_f.weight"])
    torch.testing.assert_close(grads["transformer.ln_f.weight"], g, rtol=1e-9, atol=1e-12)
    assert grads["transformer.wpe.weight"] is None or torch.all(grads["transformer.wpe.weight"] == 0)


# --- adaptive settling ----------------------------------------------------------------------------------

@torch.no_grad()
def test_adaptive_settling_settles_only_where_the_entropy_reaches_the_threshold():
    gpt, pc = make_models()
    idx = tokens(3, 12)
    base = gpt(idx)
    H = entropy_bits(base)  # (3, 12): the unsettled predictions' entropy
    threshold = H[:, :8].flatten().median()
    rows = torch.tensor([float(threshold), 0.0, 1e9])  # adaptive; always settles (0); never settles
    cache = pc.new_cache(3)
    steps = torch.full((3,), 4)
    view = cache.attention(torch.arange(8)[None].expand(3, 8), 8, torch.tensor([0, 1, 2]))
    logits, stats = pc.forward_cached(idx[:, :8], view, settle_steps=steps, last_only=False, settle_threshold=rows)
    unsure = H[:, :8] >= rows[:, None]
    assert unsure[0].any() and not unsure[0].all()
    assert torch.equal(stats["steps"] > 0, unsure)
    assert torch.all(stats["steps"][unsure] == 4)  # no early stop asked
    torch.testing.assert_close(logits[~unsure], base[:, :8][~unsure], rtol=1e-5, atol=1e-5)
    assert (logits[unsure] - base[:, :8][unsure]).abs().amax(-1).min() > 1e-5
    # decode steps: the same per row, and a row asking to stop once the energy stops falling stops sooner
    for p in range(8, 12):
        logits, stats = decode_step(pc, idx[:, p], torch.full((3,), p), cache, steps, kv_len=kv_len_bucket(p + 1, 64),
                                    max_settle_steps=4,
                                    adaptive={"settle_threshold": rows, "early_stop": torch.tensor([0.0, 0.2, 0.0])})
        assert torch.equal(stats["steps"] > 0, H[:, p] >= rows)
        assert int(stats["steps"][2]) == 0 and 1 <= int(stats["steps"][1]) < 4
        torch.testing.assert_close(logits[2], base[2, p], rtol=1e-5, atol=1e-5)


# --- the checkpoint records its options -----------------------------------------------------------------

def test_checkpoint_records_the_options_and_refuses_an_unknown_law(tmp_path):
    _, pc = option_models(OPTIONS["student_t+ln"] | {"attention_precision": True}, dtype=torch.float32)
    tok = CharTokenizer.from_text("".join(chr(32 + i) for i in range(pc.config.vocab_size)))
    save_pcgpt(tmp_path / "m", pc, tok)
    loaded, _, _ = load_checkpoint(tmp_path / "m")
    assert (loaded.config.error_law, loaded.config.ln_precision, loaded.config.attention_precision) == \
        ("student_t", True, True)
    idx = tokens(2, 7)
    torch.testing.assert_close(loaded.settled_forward(idx, settle_steps=2)[0], pc.settled_forward(idx, settle_steps=2)[0])
    # a checkpoint from before the options reads as the Gaussian energy
    assert PCConfig.from_dict({"n_layer": 2, "n_head": 2, "n_embd": 32}).error_law == "gaussian"
    config = (tmp_path / "m" / "config.json")
    config.write_text(config.read_text().replace('"student_t"', '"cauchy"'))
    with pytest.raises(CheckpointError, match="error_law"):
        load_checkpoint(tmp_path / "m")
