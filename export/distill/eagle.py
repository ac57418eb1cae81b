"""The EAGLE draft in PyTorch (Li et al. 2024), written out so training can unroll it the way speculation runs it.

Position t reads (token t+1, feature f_t): x = fc([embed(token), f]) -> one Llama layer -> final norm -> f^_{t+1};
head(f^_{t+1}) over the reduced vocabulary predicts token t+2. The embedding, head and rotary tables are the
target's, frozen (buffers, not in the state dict); fc, the layer and the final norm train.

`unroll(tokens, feats, steps)`: step 1 runs every position on the target's true features (the catch-up); step j
> 1 runs, for every start t at once, position t + j - 1 on the draft's own step j-1 prediction, attending to the
true positions 0..t and to its own steps 2..j of the same start (a diagonal), exactly what drafting j tokens after
a catch-up to t sees. Step j at start t predicts feature t + j (token t + j + 1).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def rms_norm(x, weight, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, cos, sin):
    """Non-interleaved rotary (GroupQueryAttention rotary_interleaved=0). x [B, h, T, d]; cos/sin [T, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class EagleDraft(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
                 embed, head, cos, sin):
        super().__init__()
        self.h, self.kvh, self.d, self.eps = heads, kv_heads, head_dim, eps
        self.register_buffer("embed", torch.as_tensor(embed, dtype=torch.float32), persistent=False)  # [V, H]
        self.register_buffer("head", torch.as_tensor(head, dtype=torch.float32), persistent=False)    # [N, H]
        self.register_buffer("cos", torch.as_tensor(cos, dtype=torch.float32), persistent=False)      # [P, d/2]
        self.register_buffer("sin", torch.as_tensor(sin, dtype=torch.float32), persistent=False)
        H = hidden
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.input_norm = nn.Parameter(torch.ones(H))
        self.q = nn.Linear(H, heads * head_dim, bias=False)
        self.k = nn.Linear(H, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(H, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, H, bias=False)
        self.post_norm = nn.Parameter(torch.ones(H))
        self.gate = nn.Linear(H, intermediate, bias=False)
        self.up = nn.Linear(H, intermediate, bias=False)
        self.down = nn.Linear(intermediate, H, bias=False)
        self.norm = nn.Parameter(torch.ones(H))

    def _qkv(self, x, positions):
        """x [B, T, H] -> q [B, h, T, d], k/v [B, h, T, d] (kv heads repeated), rotary at `positions` [T]."""
        B, T, _ = x.shape
        h = rms_norm(x, self.input_norm, self.eps)
        q = self.q(h).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(h).view(B, T, self.kvh, self.d).transpose(1, 2)
        v = self.v(h).view(B, T, self.kvh, self.d).transpose(1, 2)
        pos = positions.clamp(max=self.cos.shape[0] - 1)
        cos, sin = self.cos[pos], self.sin[pos]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.h // self.kvh
        return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def _finish(self, x, attn):
        """attn [B, h, T, d] -> predicted features [B, T, H]."""
        B, _, T, _ = attn.shape
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, self.h * self.d))
        h = rms_norm(x, self.post_norm, self.eps)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return rms_norm(x, self.norm, self.eps)

    def unroll(self, tokens, feats, steps: int) -> list:
        """tokens [B, T] (token t+1 at position t), feats [B, T, H] (f_t) -> [f^ of step j: [B, T, H]]."""
        B, T, _ = feats.shape
        scale = self.d ** -0.5
        ar = torch.arange(T, device=feats.device)
        causal = ar[None, :] <= ar[:, None]  # [T queries (start t), T keys]: true positions 0..t
        x = self.fc(torch.cat([self.embed[tokens], feats], -1))
        q, k1, v1 = self._qkv(x, ar)
        s = (q @ k1.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
        out = [self._finish(x, torch.softmax(s, -1) @ v1)]
        diag_k, diag_v = [], []
        for j in range(2, steps + 1):
            shifted = F.pad(tokens[:, j - 1:], (0, j - 1))   # token t+j at start t (0 past the end)
            x = self.fc(torch.cat([self.embed[shifted], out[-1]], -1))
            q, k, v = self._qkv(x, ar + j - 1)
            diag_k.append(k)
            diag_v.append(v)
            s_true = (q @ k1.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # [B, h, T, T]
            s_diag = torch.stack([(q * kk).sum(-1) * scale for kk in diag_k], -1)             # [B, h, T, j-1]
            w = torch.softmax(torch.cat([s_true, s_diag], -1), -1)
            attn = w[..., :T] @ v1 + (w[..., T:, None] * torch.stack(diag_v, -2)).sum(-2)
            out.append(self._finish(x, attn))
        return out

    def logits(self, feats):
        return feats @ self.head.T
