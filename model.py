"""
LLaMA decoder used for the SinkGD experiments (arXiv 2502.06742).

Parameter names and the rotary convention follow Hugging Face's LlamaForCausalLM
exactly, so a state_dict maps 1:1 onto an HF checkpoint. The model sizes are the
memory-efficient LLaMA benchmark of GaLore (Zhao et al., 2024).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(kw_only=True)
class LlamaConfig:
    # field names are HF's, so an exporter can write them straight into config.json
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


CONFIGS: dict[str, LlamaConfig] = {
    # tiny models for CPU runs and tests
    "llama_tiny": LlamaConfig(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_hidden_layers=4),
    "llama_small": LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=6),
    # GaLore benchmark sizes (names count parameters at GaLore's 32k vocab)
    "llama_60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama_130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama_350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama_1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
}


def rotate_half(x):
    # HF pairs dimension i with i + head_dim/2 (not adjacent dimensions as in the RoPE paper)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(x, cos, sin):
    # x: (B, n_head, T, head_dim); cos, sin: (T, head_dim), kept in high precision until here
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rope_cos_sin(config: LlamaConfig):
    # Built in the default dtype (float32, as HF does) and never in the activation dtype:
    # in bf16 the angle at position ~1000 would be off by whole radians.
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2) / head_dim))
    freqs = torch.outer(torch.arange(config.max_position_embeddings), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim), same angle for both halves of a pair
    return emb.cos(), emb.sin()


class Attention(nn.Module):

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        # (B, T, C) -> (B, n_head, T, head_dim); heads are contiguous slices of C, as in HF
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # C, or C / tp under tensor parallelism
        return self.o_proj(y)


class MLP(nn.Module):

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Llama(nn.Module):

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # a ModuleDict named `model` reproduces HF's "model.*" / "lm_head.*" key layout
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)]),
            norm=nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        # non-persistent: derived from the config, so kept out of the state_dict (as in HF)
        cos, sin = rope_cos_sin(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # HF LLaMA init; nn.RMSNorm already initializes its weight to ones
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, targets=None):
        B, T = input_ids.size()
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if targets is not None:
            # float32 even under bf16 autocast: log-softmax over 50k classes needs the precision
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token, for MFU.

    PaLM's estimate (Chowdhery et al. 2022, appendix B; also nanoGPT's estimate_mfu):
    6 FLOPs per matmul weight per token, plus 12 * layers * hidden * seq_len for the
    QK^T and attention-times-V matmuls (counted in full, not halved for the causal mask).
    The matmul weights are every nn.Linear: the untied lm_head counts, the embedding
    lookup (a gather) and the norm weights do not.
    """
    d, L = config.hidden_size, config.num_hidden_layers
    n_matmul = L * (4 * d * d + 3 * d * config.intermediate_size) + config.vocab_size * d
    return 6 * n_matmul + 12 * L * d * seq_len


# Dense bf16 tensor-core peak per GPU, for MFU (H100/H200 without a suffix: SXM).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "GH200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12}


def peak_bf16_flops(device_name: str) -> float:
    """The longest key found as whole words in the name ("H200 NVL" is no H200 SXM, "L40" no L4); NaN if none."""
    found = [k for k in PEAK_BF16_FLOPS if f" {k} " in f" {device_name.replace('-', ' ')} "]
    return PEAK_BF16_FLOPS[max(found, key=len)] if found else math.nan
