import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from model import CONFIGS, Llama, LlamaConfig, apply_rotary_emb, flops_per_token

TINY = CONFIGS["llama_tiny"]
# small enough for float64 references to be instant
MINI = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80,
                   num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=64)


@pytest.fixture
def float64_default():
    # parameters and RoPE tables are created in the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def randomized(config, seed=0):
    """A model whose weights (norms included) are far from init, so every weight matters."""
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model


def test_configs_are_the_galore_sizes():
    expected = {  # hidden, FFN, heads, layers
        "llama_tiny": (128, 384, 4, 4),
        "llama_small": (256, 688, 4, 6),
        "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12),
        "llama_350m": (1024, 2736, 16, 24),
        "llama_1b": (2048, 5461, 32, 24),
    }
    got = {name: (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers)
           for name, c in CONFIGS.items()}
    assert got == expected
    for c in CONFIGS.values():
        assert c.vocab_size == 50304 and c.vocab_size % 64 == 0 and c.vocab_size >= 50257
        assert c.max_position_embeddings == 1024 and c.rms_norm_eps == 1e-6
        assert c.rope_theta == 10000.0 and c.initializer_range == 0.02


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(hidden_size=100, intermediate_size=256, num_attention_heads=3, num_hidden_layers=1)


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = Llama(TINY)
    B, T = 2, 32
    idx = torch.randint(0, TINY.vocab_size, (B, T))
    targets = torch.randint(0, TINY.vocab_size, (B, T))

    logits, loss = model(idx)
    assert logits.shape == (B, T, TINY.vocab_size) and loss is None

    logits, loss = model(idx, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # small init -> near-uniform predictions -> loss ~ ln(vocab)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1
    # mean cross-entropy over every position, checked against an explicit log-softmax
    logp = torch.log_softmax(logits.double(), dim=-1)
    manual = -logp.gather(-1, targets[..., None]).mean()
    assert abs(loss.item() - manual.item()) < 1e-5


def test_init_matches_hf():
    torch.manual_seed(0)
    model = Llama(TINY)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight
            assert abs(w.mean().item()) < 2e-3
            assert abs(w.std().item() - TINY.initializer_range) / TINY.initializer_range < 0.05
        elif isinstance(module, nn.RMSNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert module.eps == TINY.rms_norm_eps


def test_bf16_autocast():
    torch.manual_seed(0)
    model = Llama(TINY)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 1e-2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_causality():
    model = randomized(TINY)
    T = 16
    idx = torch.randint(0, TINY.vocab_size, (1, T))
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 5, T - 1):
            changed = idx.clone()
            changed[0, t] = (idx[0, t] + 1) % TINY.vocab_size
            out, _ = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            # ... while the changed token does reach positions >= t
            assert (out[:, t:] - base[:, t:]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count(name):
    c = CONFIGS[name]
    V, d, ffn, L = c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    expected = V * d + V * d + d + L * (4 * d * d + 3 * d * ffn + 2 * d)
    with torch.device("meta"):
        model = Llama(c)
    assert model.num_params() == expected
    # FLOPs: 6 per weight of every matmul actually executed (all nn.Linear) + attention term
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert flops_per_token(c, 1024) == 6 * n_linear + 12 * L * d * 1024


def test_meta_forward_shape():
    c = CONFIGS["llama_1b"]
    with torch.device("meta"):
        model = Llama(c)
        idx = torch.zeros(2, c.max_position_embeddings, dtype=torch.long)
        logits, loss = model(idx, idx)
    assert logits.shape == (2, c.max_position_embeddings, c.vocab_size) and loss.shape == ()


def test_hf_parameter_names():
    c = replace(TINY, num_hidden_layers=2)
    with torch.device("meta"):
        model = Llama(c)
    expected = ["model.embed_tokens.weight"]
    for i in range(2):
        p = f"model.layers.{i}."
        expected += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        expected += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        expected += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    expected += ["model.norm.weight", "lm_head.weight"]
    assert [n for n, _ in model.named_parameters()] == expected
    assert list(model.state_dict()) == expected  # RoPE tables are not persisted
    sd = model.state_dict()
    d, ffn, V = c.hidden_size, c.intermediate_size, c.vocab_size
    assert sd["model.embed_tokens.weight"].shape == sd["lm_head.weight"].shape == (V, d)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (d, d)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (ffn, d)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (d, ffn)


def test_too_long_sequence_raises():
    c = replace(MINI, max_position_embeddings=8)
    model = Llama(c)
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly at the limit is fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rope_relative_position(float64_default):
    model = Llama(MINI)
    P, hd = MINI.max_position_embeddings, MINI.head_dim
    torch.manual_seed(0)
    q, k = torch.randn(hd), torch.randn(hd)
    # the same q (and k) placed at every position 0..P-1
    qr = apply_rotary_emb(q.expand(1, 1, P, hd), model.rope_cos, model.rope_sin)[0, 0]
    kr = apply_rotary_emb(k.expand(1, 1, P, hd), model.rope_cos, model.rope_sin)[0, 0]
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(P), rtol=0, atol=1e-12)
    torch.testing.assert_close(qr[0], q, rtol=0, atol=0)  # position 0 is not rotated
    scores = qr @ kr.T  # scores[i, j] = <q at i, k at j>
    # shifting both positions by one leaves every score unchanged (Toeplitz matrix) ...
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], rtol=0, atol=1e-12)
    # ... while the score does depend on the offset, so the rotation is not trivial
    assert scores[0].std() > 0.1 * q.norm() * k.norm() / hd


def reference_logits(sd, c, idx):
    """LLaMA forward written naively in float64: explicit softmax, causal mask and complex RoPE."""
    B, T = idx.shape
    d, H, eps = c.hidden_size, c.num_attention_heads, c.rms_norm_eps
    hd = d // H

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    # RoPE: pair x_i with x_{i+hd/2} as the complex number x_i + 1j*x_{i+hd/2},
    # rotated at position p by angle p * theta^(-2i/hd)
    freqs = c.rope_theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rope(x):
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * rotation
        return torch.cat([z.real, z.imag], dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][idx]
    for i in range(c.num_hidden_layers):
        W = {k.removeprefix(f"model.layers.{i}."): v for k, v in sd.items()
             if k.startswith(f"model.layers.{i}.")}
        h = rmsnorm(x, W["input_layernorm.weight"])
        q, k, v = (
            (h @ W[f"self_attn.{n}_proj.weight"].T).view(B, T, H, hd).transpose(1, 2) for n in "qkv"
        )
        q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.exp(scores - scores.amax(-1, keepdim=True))
        att = att / att.sum(-1, keepdim=True)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + y @ W["self_attn.o_proj.weight"].T
        h = rmsnorm(x, W["post_attention_layernorm.weight"])
        gate = h @ W["mlp.gate_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ W["mlp.up_proj.weight"].T)) @ W["mlp.down_proj.weight"].T
    return rmsnorm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_matches_naive_float64_reference(float64_default):
    model = randomized(MINI)
    idx = torch.randint(0, MINI.vocab_size, (2, MINI.max_position_embeddings))
    with torch.no_grad():
        logits, _ = model(idx)
        expected = reference_logits(model.state_dict(), MINI, idx)
    assert logits.dtype == torch.float64
    assert expected.abs().max() > 1.0  # the comparison below is not between near-zero tensors
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers")
    c = MINI
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        num_hidden_layers=c.num_hidden_layers, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    )
    model = randomized(c)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    idx = torch.randint(0, c.vocab_size, (2, c.max_position_embeddings))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
