"""Behaviour of the predictive-coding GPT (model/pc.py, docs/pc.md) and of training (model/train.py).

The models are the 'tiny' preset with random baseline weights, non-trivial LayerNorms and
generators whose output projections are non-zero (a fresh generator predicts z_{l-1} = z_l), so
that settling really moves the states. Everything runs in fp32 unless a test says otherwise.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.gpt import GPT, preset_config
from pcgpt.model.generate import decode_step, kv_len_bucket
from pcgpt.model.pc import PCGPT, OwnKeyMask, PastAttention, attention_with_past
from pcgpt.model.train import TrainConfig, train

VOCAB = 97  # the tiny preset's
DATA = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"




def make_models(seed=0, dtype=torch.float32, **overrides):
    """(baseline GPT, PCGPT.from_baseline of it), both in eval mode, generators made non-trivial."""
    torch.manual_seed(seed)
    gpt = GPT(preset_config("tiny", **overrides))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "ln" in name:  # LayerNorms away from the identity
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    gpt = gpt.to(dtype).eval()
    pc = PCGPT.from_baseline(gpt).to(dtype).eval()
    with torch.no_grad():
        for gen in pc.generators:
            torch.nn.init.normal_(gen.c_proj.weight, std=0.05)
            torch.nn.init.normal_(gen.c_proj.bias, std=0.02)
            torch.nn.init.normal_(gen.c_fc.weight, std=0.1)
        pc.rho.copy_(torch.linspace(-0.3, 0.4, pc.config.n_layer))
    return gpt, pc


def cached(model, idx, pos, cache, slots, settle_steps=None, last_only=True):
    """model.forward_cached of tokens idx (B, S) at positions pos (B, S) into cache rows `slots`,
    attending over positions [0, max(pos)]."""
    view = cache.attention(pos, int(pos.max()) + 1, torch.as_tensor(slots))
    return model.forward_cached(idx, view, settle_steps=settle_steps, last_only=last_only)


def tokens(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def parallel_inputs(pc, idx):
    """What settled_forward hands to settle(): z_0, [z_1..z_L], amortised K/V and the mask."""
    zs = pc.feedforward(idx)
    pasts, mask = pc.parallel_context(zs)
    return zs[0], zs[1:], pasts, mask


def settle(pc, idx, T, alpha, **kw):
    z0, zs, pasts, mask = parallel_inputs(pc, idx)
    steps = torch.as_tensor(T).expand(idx.shape[0]) if not isinstance(T, torch.Tensor) else T
    return pc.settle(z0, zs, pasts, mask, steps, alpha, **kw)


# --- T = 0 is the baseline -------------------------------------------------------------------------

# PC at T = 0 runs the baseline's modules on the same inputs; the tolerance allows for kernels that
# pick different reduction orders for different shapes (fp32).
T0_ATOL, T0_RTOL = 1e-5, 1e-5


@torch.no_grad()
def test_t0_equals_baseline_parallel_and_cached():
    gpt, pc = make_models()
    idx = tokens(3, 12)
    base = gpt(idx)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=T0_ATOL, rtol=T0_RTOL)
    settled, unsettled, info = pc.settled_forward(idx, settle_steps=0)
    close(settled, base)
    close(unsettled, base)
    close(pc(idx, settle_steps=0), base)
    assert torch.equal(info["energy"], info["energy0"]) and int(info["steps"].sum()) == 0
    # the unsettled logits of a settling call are the baseline's too
    close(pc.settled_forward(idx, settle_steps=2)[1], base)

    # cached: prefill (all positions) into slots in any order, then batched decode steps (row b =
    # slot b) with per-row positions and a bucketed window, T = 0 known on the host
    pos = torch.arange(8)[None].expand(3, 8)
    c_gpt, c_pc = gpt.new_cache(3), pc.new_cache(3)
    a, _ = cached(gpt, idx[:, :8], pos, c_gpt, [2, 0, 1], last_only=False)
    b, stats = cached(pc, idx[:, :8], pos, c_pc, [2, 0, 1], settle_steps=0, last_only=False)
    close(a, b)
    close(b, base[:, :8])
    assert int(stats["steps"].sum()) == 0
    order = torch.tensor([1, 2, 0])  # the batch row held by each slot
    for p in range(8, 12):
        ip = torch.full((3,), p)
        zeros = torch.zeros(3, dtype=torch.long)
        kv_len = kv_len_bucket(p + 1, c_gpt.max_len)
        a, _ = decode_step(gpt, idx[order, p], ip, c_gpt, kv_len=kv_len)
        b, stats = decode_step(pc, idx[order, p], ip, c_pc, zeros, kv_len=kv_len, max_settle_steps=0)
        close(a, b)
        close(b, base[order, p])
        assert int(stats["steps"].sum()) == 0
    close(c_gpt.k, c_pc.k)
    close(c_gpt.v, c_pc.v)


@torch.no_grad()
def test_settling_moves_and_feedforward_errors():
    """At the feed-forward states the bottom-up errors are ~0 and the top-down ones are not, so
    settling moves the logits."""
    _, pc = make_models()
    idx = tokens(2, 10)
    _, info = settle(pc, idx, 0, 0.1)
    assert info["err_up"].max() < 1e-9  # squared norms per layer
    assert info["err_down"].min() > 1e-2
    assert torch.all(info["energy0"] > 0)
    settled, unsettled, info = pc.settled_forward(idx, settle_steps=1)
    assert (settled - unsettled).abs().max() > 1e-3
    assert torch.all(info["energy"] < info["energy0"])


# --- κ = 0: nothing to settle ----------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
@torch.no_grad()
def test_kappa_zero_is_a_noop(alpha):
    _, pc = make_models()
    pc.rho.fill_(float("-inf"))
    assert torch.all(pc.kappa() == 0)
    idx = tokens(2, 10)
    for T in (1, 4, 16):
        settled, unsettled, info = pc.settled_forward(idx, settle_steps=T, alpha=alpha)
        torch.testing.assert_close(settled, unsettled, rtol=0, atol=1e-5)
        assert torch.all(info["energy"] <= info["energy0"]) and info["energy0"].max() < 1e-9
    # cached path too
    cache = pc.new_cache(2)
    pos = torch.arange(10)[None].expand(2, 10)
    logits, stats = cached(pc, idx, pos, cache, torch.tensor([1, 0]), settle_steps=16, last_only=False)
    torch.testing.assert_close(logits, unsettled, rtol=0, atol=1e-5)


# --- energy never rises ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0, 100.0])
@torch.no_grad()
def test_energy_never_rises_with_backtracking(alpha):
    _, pc = make_models()
    idx = tokens(2, 9)
    previous = None
    for T in range(1, 9):
        _, info = settle(pc, idx, T, alpha)
        assert torch.all(info["energy"] <= info["energy0"])
        if previous is not None:  # settling T steps continues the T-1 run: monotone step by step
            assert torch.all(info["energy"] <= previous)
        previous = info["energy"]
        assert torch.all(info["steps"] <= T) and torch.all(info["steps"] == T)  # no early stop
        assert torch.all(info["rejected"] <= info["steps"])
    if alpha >= 10:  # large steps overshoot: backtracking has to reject some
        assert int(info["rejected"].sum()) > 0
    if alpha <= 10:  # ... and within 8 halvings finds a step that lowers the energy
        assert torch.all(info["energy"] < info["energy0"])


@torch.no_grad()
def test_early_stop_uses_fewer_steps_and_never_raises_energy():
    _, pc = make_models()
    idx = tokens(2, 9)
    _, full = settle(pc, idx, 16, 0.1)
    pc.config.early_stop = 0.03
    _, early = settle(pc, idx, 16, 0.1)
    assert torch.all(early["steps"] <= full["steps"]) and early["steps"].sum() < full["steps"].sum()
    assert early["steps"].min() >= 1
    assert torch.all(early["energy"] <= early["energy0"])
    # positions that stopped early keep the energy they had reached, which full settling lowers further
    stopped = early["steps"] < 16
    assert stopped.any() and torch.all(full["energy"][stopped] <= early["energy"][stopped] + 1e-6)


# --- the settling step is the preconditioned gradient of E --------------------------------------------

def test_preconditioner_matches_design():
    _, pc = make_models(n_layer=3)
    kappa = torch.tensor([0.5, 2.0, 3.0])
    # D_l = π_l + κ_l + κ_{l+1} + [l<L]·π_{l+1}, π = 1, κ_{L+1} = 0
    expected = torch.tensor([1 + 0.5 + 2.0 + 1, 1 + 2.0 + 3.0 + 1, 1 + 3.0])
    torch.testing.assert_close(pc.preconditioner(kappa), expected)
    with torch.no_grad():
        pc.rho.copy_(torch.tensor([0.0, 5.0, -1.0]))
    torch.testing.assert_close(pc.kappa(), torch.tensor([1.0, math.e ** pc.config.rho_max, math.exp(-1.0)]))


def analytic_gradient(pc, z0, zs, kappa):
    """∂E/∂z_l at the feed-forward states, where every bottom-up error is zero:
    κ_{l+1}·(z_l − g_{l+1}(z_{l+1})) − κ_l·J_{g_l}(z_l)ᵀ (z_{l−1} − g_l(z_l))."""
    L = len(zs)
    below = [z0] + zs[:-1]
    grads = []
    for l in range(L):
        z = zs[l].detach().requires_grad_(True)
        d_l = below[l] - pc.generators[l](z)
        (vjp,) = torch.autograd.grad(pc.generators[l](z), z, grad_outputs=d_l.detach())
        g = -kappa[l] * vjp  # ∂/∂z of ½κ‖below − g(z)‖² = −κ·J_g(z)ᵀ (below − g(z))
        if l + 1 < L:
            g = g + kappa[l + 1] * (zs[l] - pc.generators[l + 1](zs[l + 1]))
        grads.append(g.detach())
    return grads


def test_settling_step_is_preconditioned_gradient_of_energy():
    _, pc = make_models(dtype=torch.float64)
    idx = tokens(2, 8)
    alpha = 0.05
    with torch.no_grad():
        z0, zs, pasts, mask = parallel_inputs(pc, idx)
    kappa = pc.kappa().detach()
    new, info = pc.settle(z0, zs, pasts, mask, torch.ones(2, dtype=torch.long), alpha)
    assert int(info["rejected"].sum()) == 0 and torch.all(info["steps"] == 1)
    D = pc.preconditioner(kappa)
    steps = [(zn - z) / (-alpha / D[l]) for l, (zn, z) in enumerate(zip(new, zs))]
    # autograd of energy() at the feed-forward states, each z_l a free variable
    free = [z.clone().requires_grad_(True) for z in zs]
    E, _, _ = pc.energy(z0, free, pasts, mask, kappa)
    auto = torch.autograd.grad(E.sum(), free)
    analytic = analytic_gradient(pc, z0, zs, kappa)
    for s, a, g in zip(steps, auto, analytic):
        assert a.abs().max() > 1e-2  # not a vacuous comparison
        torch.testing.assert_close(s, a, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(a, g, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_feedforward_start_equals_the_full_autograd_start(T):
    """Inference starts from the feed-forward states, where every bottom-up error is zero, so its
    first step takes the gradient through the generators only (no backward pass through the
    blocks): it must settle to the same states as the full autograd start."""
    _, pc = make_models()
    idx = tokens(3, 10)
    fast, fast_info = settle(pc, idx, T, 0.5)
    full, full_info = settle(pc, idx, T, 0.5, from_feedforward=False)
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_info["steps"], full_info["steps"])
    torch.testing.assert_close(fast_info["energy0"], full_info["energy0"], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fast_info["energy"], full_info["energy"], atol=1e-7, rtol=1e-5)


def test_local_settling_with_clamped_targets_moves_the_hidden_states_towards_the_targets():
    """Local learning settles with the output clamped: the readout's CE joins the energy, so the
    settled top state predicts the targets better than the unclamped settled one."""
    _, pc = make_models()
    idx = tokens(2, 12)
    targets = tokens(2, 12, seed=7)
    free, _ = settle(pc, idx, 4, 0.25)
    clamped, info = settle(pc, idx, 4, 0.25, targets=targets)
    ce = lambda z: F.cross_entropy(pc.head(z).flatten(0, 1), targets.flatten()).item()
    assert ce(clamped[-1]) < ce(free[-1])
    assert (info["energy"] <= info["energy0"] + 1e-6).all()


def test_unrolled_settling_in_training_equals_inference_settling():
    """With create_graph (training) the step must still be the partial ∂E/∂z_l with the amortised
    K/V held fixed, the same trajectory as at inference, and backpropagating through it works."""
    _, pc = make_models()
    pc.train()
    idx = tokens(2, 8)
    z0, zs, pasts, mask = parallel_inputs(pc, idx)  # with the graph to the weights
    steps = torch.full((2,), 3, dtype=torch.long)
    kappa = pc.kappa().detach()
    graph, _ = pc.settle(z0, zs, pasts, mask, steps, 0.25, kappa=kappa, create_graph=True)
    plain, _ = pc.settle(z0.detach(), [z.detach() for z in zs], [(k.detach(), v.detach()) for k, v in pasts],
                         mask, steps, 0.25, kappa=kappa)
    for a, b in zip(graph, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    graph[-1].pow(2).sum().backward()
    assert pc.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert pc.generators[-1].c_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("positions", [[5, 5], [2, 6]], ids=["level-rows", "ragged-rows"])
def test_fused_attention_with_own_key_equals_the_explicit_path(positions):
    """attention_with_past through OwnKeyMask (one SDPA call, what inference settling runs) equals
    the explicit scores-softmax path (what unrolled training differentiates twice), values and
    gradients w.r.t. the settling states, for cached queries at the same or different positions."""
    _, pc = make_models()
    attn = pc.transformer.h[1].attn
    g = torch.Generator().manual_seed(3)
    B, C, H = 2, pc.config.n_embd, pc.config.n_head
    Lk = max(positions)
    k_past = torch.randn(B, H, Lk, C // H, generator=g)
    v_past = torch.randn(B, H, Lk, C // H, generator=g)
    past_mask = torch.arange(Lk)[None, None, None, :] < torch.tensor(positions)[:, None, None, None]
    x = torch.randn(B, 1, C, generator=g, requires_grad=True)
    explicit = attention_with_past(*attn.qkv(x), k_past, v_past, past_mask)
    fused_mask = OwnKeyMask.from_past(past_mask, B)
    assert (fused_mask.mask is None) == (positions[0] == positions[1])  # nothing to mask when level
    fused = attention_with_past(*attn.qkv(x), k_past, v_past, fused_mask)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)
    w = torch.randn(explicit.shape, generator=g)
    (grad_explicit,) = torch.autograd.grad((explicit * w).sum(), x)
    (grad_fused,) = torch.autograd.grad((fused * w).sum(), x)
    torch.testing.assert_close(grad_fused, grad_explicit, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_served_settling_equals_settling_through_trainable_weights():
    """A served model's weights take no gradient, a trainable model's do: both settle through the
    same modules to the same logits and stats, before and after the weights change in place."""
    _, pc = make_models(seed=5)
    idx = tokens(2, 9, seed=6)
    pos = torch.arange(9)[None].expand(2, 9)

    def settled(model):
        out, stats = cached(model, idx, pos, model.new_cache(2), torch.tensor([1, 0]), settle_steps=3)
        return out, stats["energy"]

    assert any(p.requires_grad for p in pc.transformer.h.parameters())
    trainable = settled(pc)
    served = copy.deepcopy(pc).requires_grad_(False)
    torch.testing.assert_close(settled(served), trainable, atol=0, rtol=0)
    for model in (pc, served):  # the same update to both, in place, after the lookup
        for p in model.transformer.h.parameters():
            p.mul_(1.1)
    torch.testing.assert_close(settled(served), settled(pc), atol=0, rtol=0)
    assert not torch.equal(settled(pc)[0], trainable[0])


# --- cached settling, causality, batching ------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 3])
@torch.no_grad()
def test_cached_settling_equals_parallel(T):
    """Prefill then one-token decodes, two rows at different lengths in non-contiguous (and
    previously used) slots, give each position the logits of settling the whole sequence at once."""
    _, pc = make_models()
    seqs = [tokens(1, 8, seed=3)[0], tokens(1, 12, seed=4)[0]]
    prompt_lens = [4, 8]
    slots = [4, 1]
    cache = pc.new_cache(5, max_len=16)
    # stale contents in the slots: a longer unrelated sequence
    for s in slots:
        junk = tokens(1, 16, seed=9)
        cached(pc, junk, torch.arange(16)[None], cache, torch.tensor([s]), settle_steps=0)
    parallel = [pc.settled_forward(seq[None], settle_steps=T)[0][0] for seq in seqs]

    for seq, n, s, ref in zip(seqs, prompt_lens, slots, parallel):
        # prefill settling every position equals parallel settling of the prompt alone ...
        cache_all = pc.new_cache(5, max_len=16)
        all_logits, _ = cached(pc, seq[None, :n], torch.arange(n)[None], cache_all, torch.tensor([s]),
                                          settle_steps=T, last_only=False)
        torch.testing.assert_close(all_logits[0], pc.settled_forward(seq[None, :n], settle_steps=T)[0][0],
                                   rtol=0, atol=1e-5)
        # ... and the last-only prefill into the shared cache equals the full sequence's position n-1
        last, stats = cached(pc, seq[None, :n], torch.arange(n)[None], cache, torch.tensor([s]), settle_steps=T)
        torch.testing.assert_close(last[0], ref[n - 1], rtol=0, atol=1e-5)
        assert int(stats["steps"][0]) == T

    # decode both rows together, each at its own position, slots (4, 1) non-contiguous
    for i in range(4):
        toks = torch.stack([seqs[0][prompt_lens[0] + i], seqs[1][prompt_lens[1] + i]]).view(2, 1)
        pos = torch.tensor([[prompt_lens[0] + i], [prompt_lens[1] + i]])
        logits, stats = cached(pc, toks, pos, cache, torch.tensor(slots), settle_steps=T)
        for r in range(2):
            torch.testing.assert_close(logits[r], parallel[r][prompt_lens[r] + i], rtol=0, atol=1e-5)
        assert torch.all(stats["steps"] == T)


@torch.no_grad()
def test_causality_later_tokens_never_change_earlier_settled_logits():
    _, pc = make_models()
    idx = tokens(2, 12)
    for p in (1, 6, 11):
        other = idx.clone()
        other[:, p:] = (other[:, p:] + 1 + torch.arange(12 - p)) % VOCAB
        for T in (1, 4):
            a, _, ia = pc.settled_forward(idx, settle_steps=T)
            b, _, ib = pc.settled_forward(other, settle_steps=T)
            torch.testing.assert_close(a[:, :p], b[:, :p], rtol=0, atol=1e-6)
            torch.testing.assert_close(ia["energy"][:, :p], ib["energy"][:, :p], rtol=0, atol=1e-6)
            assert (a[:, p:] - b[:, p:]).abs().max() > 1e-3


@torch.no_grad()
def test_row_settles_the_same_alone_or_in_a_batch():
    _, pc = make_models()
    idx = tokens(3, 10)
    steps = torch.tensor([2, 0, 5])
    batch, _, binfo = pc.settled_forward(idx, settle_steps=steps)
    for r in range(3):
        alone, _, ainfo = pc.settled_forward(idx[r:r + 1], settle_steps=int(steps[r]))
        torch.testing.assert_close(batch[r], alone[0], rtol=0, atol=1e-5)
        assert torch.equal(binfo["steps"][r], ainfo["steps"][0])

    # cached: a prefilled batch decoding with per-row settle steps
    n = 7
    cache = pc.new_cache(3)
    slots = torch.tensor([0, 2, 1])
    cached(pc, idx[:, :n], torch.arange(n)[None].expand(3, n), cache, slots, settle_steps=0)
    logits, stats = cached(pc, idx[:, n:n + 1], torch.full((3, 1), n), cache, slots, settle_steps=steps)
    assert torch.equal(stats["steps"], steps)
    for r in range(3):
        solo = pc.new_cache(1)
        cached(pc, idx[r:r + 1, :n], torch.arange(n)[None], solo, torch.tensor([0]), settle_steps=0)
        alone, _ = cached(pc, idx[r:r + 1, n:n + 1], torch.tensor([[n]]), solo, torch.tensor([0]),
                                     settle_steps=torch.tensor([int(steps[r])]))
        torch.testing.assert_close(logits[r], alone[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[r], batch[r, n], rtol=0, atol=1e-5)


@torch.no_grad()
def test_rows_with_zero_steps_in_a_mixed_batch_equal_the_baseline():
    gpt, pc = make_models()
    idx = tokens(3, 9)
    steps = torch.tensor([0, 3, 0])
    settled, _, info = pc.settled_forward(idx, settle_steps=steps)
    base = gpt(idx)
    torch.testing.assert_close(settled[[0, 2]], base[[0, 2]], atol=T0_ATOL, rtol=T0_RTOL)
    assert (settled[1] - base[1]).abs().max() > 1e-3
    assert torch.equal(info["energy"][0], info["energy0"][0]) and int(info["steps"][0].sum()) == 0

    slots = torch.tensor([1, 0, 2])
    pos = torch.arange(9)[None].expand(3, 9)
    c_gpt, c_pc = gpt.new_cache(3), pc.new_cache(3)
    a, _ = cached(gpt, idx, pos, c_gpt, slots)
    b, stats = cached(pc, idx, pos, c_pc, slots, settle_steps=steps)
    torch.testing.assert_close(b[[0, 2]], a[[0, 2]], atol=T0_ATOL, rtol=T0_RTOL)
    assert (a[1] - b[1]).abs().max() > 1e-3
    assert torch.equal(stats["steps"], steps)


# --- local learning -----------------------------------------------------------------------------------

def test_each_local_rule_is_the_gradient_of_its_own_energy_term():
    _, pc = make_models(dtype=torch.float64)
    d, L = pc.config.n_embd, pc.config.n_layer
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    with torch.no_grad():
        zs = pc.feedforward(idx)
        pasts, mask = pc.parallel_context(zs)
        # states off the feed-forward ones, so that every error term is non-zero
        states = [zs[0]] + [z + 0.1 * torch.randn_like(z) for z in zs[1:]]
    total = pc.local_terms(states, pasts, mask, targets)
    params = dict(pc.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)))

    kappa = pc.kappa()
    own_up, own_down, own_rho = [], [], []
    for l in range(L):
        block, gen = pc.transformer.h[l], pc.generators[l]
        e_up = states[l + 1] - block(states[l], PastAttention(*pasts[l], mask))
        e_down = states[l] - gen(states[l + 1])
        sq_down = (e_down * e_down).sum(-1).mean()
        own_up.append(0.5 * (e_up * e_up).sum(-1).mean() / d)
        own_down.append(0.5 * kappa[l].detach() * sq_down / d)
        own_rho.append((0.5 * kappa[l] * sq_down.detach() - 0.5 * d * torch.log(kappa[l])) / d)
        # ρ's rule in closed form: ∂/∂ρ of (½e^ρ S − ½ d ρ)/d = (κ S − d)/(2d)
        assert abs(float(grads["rho"][l]) - float((kappa[l] * sq_down - d).detach() / (2 * d))) < 1e-10
    ce = F.cross_entropy(pc.head(states[-1]).view(-1, VOCAB), targets.view(-1))
    rebuilt = sum(own_up) + sum(own_rho) + ce  # own_rho holds the value of the top-down terms too
    torch.testing.assert_close(total, rebuilt, rtol=1e-12, atol=1e-12)

    def check(term, prefix):
        names = [n for n in params if n.startswith(prefix)]
        expected = torch.autograd.grad(term, [params[n] for n in names], allow_unused=True, retain_graph=True)
        for n, e in zip(names, expected):
            e = torch.zeros_like(params[n]) if e is None else e
            torch.testing.assert_close(grads[n], e, rtol=1e-9, atol=1e-12)
        assert any(grads[n].abs().max() > 0 for n in names)

    for l in range(L):
        check(own_up[l], f"transformer.h.{l}.")
        check(own_down[l], f"generators.{l}.")
        # no other error term reaches block l or generator l
        others = sum(own_up[m] for m in range(L) if m != l) + sum(own_down[m] for m in range(L) if m != l) + ce
        for n in params:
            if n.startswith((f"transformer.h.{l}.", f"generators.{l}.")):
                (g,) = torch.autograd.grad(others, params[n], allow_unused=True, retain_graph=True)
                assert g is None or torch.all(g == 0), n
    expected_rho = torch.autograd.grad(sum(own_rho), pc.rho, retain_graph=True)[0]
    torch.testing.assert_close(grads["rho"], expected_rho, rtol=1e-9, atol=1e-12)
    # the readout (ln_f, tied lm_head / wte) learns from the CE alone; positions from nothing
    check(ce, "transformer.ln_f.")
    (g_wte,) = torch.autograd.grad(ce, params["transformer.wte.weight"])
    torch.testing.assert_close(grads["transformer.wte.weight"], g_wte, rtol=1e-9, atol=1e-12)
    assert grads["transformer.wpe.weight"] is None or torch.all(grads["transformer.wpe.weight"] == 0)


def test_local_loss_runs_and_updates_every_part():
    _, pc = make_models()
    pc.train()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    loss, info = pc.loss(idx, targets, learning="local", k_max=2)
    loss.backward()
    assert math.isfinite(loss.item()) and info["K"] == 2
    for l in range(pc.config.n_layer):
        assert pc.transformer.h[l].mlp.c_fc.weight.grad.abs().sum() > 0
        assert pc.generators[l].c_fc.weight.grad.abs().sum() > 0
    assert torch.all(pc.rho.grad != 0)


# --- κ stays out of the CE path --------------------------------------------------------------------------

def test_kappa_gets_no_gradient_from_the_task_loss():
    _, pc = make_models()
    pc.train()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        pc.zero_grad(set_to_none=True)
        loss, info = pc.loss(idx, targets, k_max=2, lambda_energy=0.0)
        loss.backward()
        seen.add(info["K"])
        assert pc.rho.grad is None or torch.all(pc.rho.grad == 0), info
        assert pc.generators[-1].c_proj.weight.grad is not None or info["K"] == 0
    assert seen >= {1, 2}
    pc.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = pc.loss(idx, targets, k_max=2, lambda_energy=0.01)
    loss.backward()
    assert pc.rho.grad is not None and torch.all(pc.rho.grad != 0)  # the free energy trains κ


# --- training -----------------------------------------------------------------------------------------

def history_of(out_dir):
    config = json.loads((Path(out_dir) / "config.json").read_text())
    return config, config["training"]["history"]


def run(tmp, name, **kw):
    cfg = dict(data=str(tmp / "text.txt"), out_dir=str(tmp / name), preset="tiny", block_size=32, batch_size=8,
               max_iters=40, eval_interval=20, eval_iters=4, warmup_iters=5, learning_rate=3e-3, min_lr=3e-4,
               threads=1)
    cfg.update(kw)
    result = train(TrainConfig(**cfg))
    return result, tmp / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A text and a baseline trained on it (shared by the PC runs that start from it)."""
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "text.txt").write_text(DATA.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    result, out = run(tmp, "base", max_iters=60)
    return tmp, result, out


def check_checkpoint(out, model_type, result):
    model, tokenizer, meta = load_checkpoint(out)
    assert model.model_type == model_type and meta["model_type"] == model_type
    assert isinstance(model, PCGPT) == (model_type == "pc")
    config, history = history_of(out)
    assert history[0]["iter"] == 0 and history[-1]["iter"] <= result["iter"]  # the best checkpoint's history
    assert result["val"] < history[0]["val"], history
    assert meta["eval"]["val_loss"] == pytest.approx(min(h["val"] for h in history))
    return model, history


def test_train_baseline(trained):
    tmp, result, out = trained
    model, history = check_checkpoint(out, "gpt", result)
    assert result["iter"] == 60 and result["val"] < history[0]["val"] - 0.3


def test_train_pc_from_scratch(trained):
    tmp, _, _ = trained
    result, out = run(tmp, "pc", model_type="pc")
    model, history = check_checkpoint(out, "pc", result)
    assert result["val"] < history[0]["val"] - 0.3


def test_train_pc_generators_keeps_the_baseline(trained):
    tmp, _, base_dir = trained
    result, out = run(tmp, "pcgen", model_type="pc", init_from=str(base_dir), pc_train="generators",
                      learning_rate=1e-2)
    pc, history = check_checkpoint(out, "pc", result)
    base, _, _ = load_checkpoint(base_dir)
    pc_state = pc.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(pc_state[k], v), k
    assert any(p.abs().max() > 0 for p in (g.c_proj.weight for g in pc.generators))  # generators trained
    idx = tokens(2, 32) % pc.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(pc.settled_forward(idx, settle_steps=0)[0], base(idx), atol=T0_ATOL, rtol=T0_RTOL)


def test_train_pc_local_learning(trained):
    tmp, _, _ = trained
    result, out = run(tmp, "pclocal", model_type="pc", pc_learning="local", max_iters=30, eval_interval=15)
    config, history = history_of(out)
    assert config["training"]["config"]["pc_learning"] == "local"
    check_checkpoint(out, "pc", result)


def test_train_pc_resume(trained):
    """Stopping at 20 iterations and resuming to 40 is the same run as 40 without a stop."""
    tmp, _, _ = trained
    common = dict(model_type="pc", eval_interval=10, lr_decay_iters=40)
    first, out = run(tmp, "pcresume", max_iters=20, **common)
    assert first["iter"] == 20 and (out / "train_state.pt").is_file()
    second, out = run(tmp, "pcresume", max_iters=40, resume=True, **common)
    assert second["iter"] == 40
    model, history = check_checkpoint(out, "pc", second)
    state = torch.load(out / "train_state.pt", weights_only=True)
    iters = [h["iter"] for h in json.loads(state["history"])]
    assert iters == [0, 10, 20, 30, 40]  # the resumed iteration is not evaluated and recorded twice
    whole, whole_out = run(tmp, "pcwhole", max_iters=40, **common)
    assert second["val"] == pytest.approx(whole["val"], abs=1e-5)
    resumed, _, _ = load_checkpoint(out)
    straight, _, _ = load_checkpoint(whole_out)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=k)


@torch.no_grad()
def test_zero_step_shortcut_reports_what_the_settling_path_reports():
    """A batch where nothing settles skips settle(); its logits and diagnostics must equal those of
    the same row decoded in a batch where another row settles (which runs settle())."""
    gpt, pc = make_models()
    idx = tokens(2, 9)
    outs = {}
    for name, steps in (("shortcut", [0, 0]), ("settling", [0, 3])):
        cache = pc.new_cache(2)
        slots = torch.tensor([0, 1])
        cached(pc, idx[:, :8], torch.arange(8).expand(2, 8), cache, slots, torch.tensor(steps))
        outs[name] = cached(pc, idx[:, 8:], torch.full((2, 1), 8), cache, slots, torch.tensor(steps))
    (l_fast, s_fast), (l_full, s_full) = outs["shortcut"], outs["settling"]
    torch.testing.assert_close(l_fast[0], l_full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(l_fast[0], gpt(idx)[0, 8], atol=1e-5, rtol=0)
    for key in ("energy0", "energy", "kl_settle", "err_down"):
        torch.testing.assert_close(s_fast[key][0], s_full[key][0], atol=1e-6, rtol=1e-4)
    assert int(s_fast["steps"][0]) == 0 and float(s_fast["err_up"][0].abs().max()) == 0.0
