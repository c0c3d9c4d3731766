"""nanoGPT-style PyTorch Llama with the same architecture as jaxllm.core.model.Transformer, used only by
the `peer` benchmark suite (same shape, data, batch and optimizer, measured in the same run)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):  # x [B, H, T, Dh]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        D, H, K, Dh, Fd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim
        self.attn_norm, self.mlp_norm = RMSNorm(D, c.norm_eps), RMSNorm(D, c.norm_eps)
        self.q, self.k, self.v = nn.Linear(D, H * Dh, bias=False), nn.Linear(D, K * Dh, bias=False), nn.Linear(D, K * Dh, bias=False)
        self.o = nn.Linear(H * Dh, D, bias=False)
        self.gate, self.up, self.down = nn.Linear(D, Fd, bias=False), nn.Linear(D, Fd, bias=False), nn.Linear(Fd, D, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.c
        h = self.attn_norm(x)
        q = self.q(h).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_heads != c.n_kv_heads)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                std = c.init_std / math.sqrt(2 * c.n_layers) if n.endswith(("o.weight", "down.weight")) else c.init_std
                nn.init.normal_(p, std=1.0 if n == "embed.weight" else std)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        ang = torch.arange(c.max_seq_len).float()[:, None] * inv
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens, targets=None):
        T = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def make_optimizer(model, opt_cfg):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
