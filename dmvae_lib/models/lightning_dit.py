"""LightningDiT: the latent velocity net of the DMVAE ImageNet pipeline (teacher, fake net, final model).

A DiT (Peebles & Xie, arXiv 2212.09748) with the LightningDiT upgrades (Yao et al., arXiv 2501.01423):
RMSNorm, SwiGLU, QK-norm and 2-D RoPE. One signature like every net here, `net(x_t, t, y=None) -> v`,
with x_t (B, C, H, W) on the linear path of `flow.py` (t = 0 noise, t = 1 data) and v = data − noise.

    tokens   h_0 = PatchEmbed(x_t) + P                 conv k = s = p; P fixed 2-D sin-cos (row/col halves)
    cond     c   = MLP(sinusoid(s·t)) + E[y]           E has num_classes + 1 rows; the last is the null label
    block    (α₁, β₁, γ₁, α₂, β₂, γ₂) = Linear(SiLU(c))  adaLN-Zero, modulate(h, β, α) = h·(1 + α) + β
             h ← h + γ₁ · Attn(modulate(RMSNorm(h), β₁, α₁))
             h ← h + γ₂ · SwiGLU(modulate(RMSNorm(h), β₂, α₂))
    attn     q, k ← RoPE(RMSNorm_hd(q)), RoPE(RMSNorm_hd(k));  softmax(q kᵀ / √d_h) v  (fused SDPA)
    swiglu   W₃ (silu(a) ⊙ b),  (a, b) = W₁₂ h,  hidden = int(2/3 · mlp_ratio · D)
    out      v = Unpatchify(Linear(modulate(RMSNorm(h_L), β, α)))

RoPE (2-D, EVA-02 style): the first half of each head's dims rotates with the token's row, the second half
with its column; inside each half, adjacent pairs (x_{2i}, x_{2i+1}) turn by angle pos·θ^(−4i/d_h), θ = 10⁴.
So q(p)·k(p') depends on p − p' only (tested). It sits on top of the absolute P, as in the reference.

Init (adaLN-Zero): xavier-uniform Linear weights with zero bias, label table and t-MLP N(0, 0.02), and zero
adaLN outputs and final Linear, so an untrained net outputs exactly v = 0.

Time embedding, our choice: sinusoid of s·t with s = `time_scale` = 1000 (as in `score_nets`, cos half first,
256 features). The reference feeds the raw t ∈ [0, 1], where the highest frequency turns by only 1 rad over
the whole range and most features are nearly constant; s = 1000 spreads the frequencies over [0, 1] the way
DiT's integer timesteps did. `time_scale=1.0` gives the reference's embedding; parameter counts are unchanged.

Position table, our choice: P's first half of dims codes the token's row, the second its column
(`pos_embed_order="row_col"`). The reference (like DiT and MAE, whose numpy meshgrid puts the column first)
orders them the other way round, `"col_row"`. Both are fixed tables, not weights: a net trained under one
order needs the same order to reproduce its outputs (the authors' released weights run with
`time_scale=1.0, pos_embed_order="col_row"`: `models/released.py`, AUTHORS_DIT_SETTINGS).

Label dropout for CFG training is the explicit `drop_labels` helper, not a train-mode side effect of
`forward`: a net left in train mode then never silently drops labels while the DM loss evaluates it.

Reference code followed (read, not copied; it carries no licence): hustvl/LightningDiT via sen-ye/dmvae,
`diffusion/lightningdit/lightningdit.py`. Sizes and parameter counts: `DIT_SIZES` at the bottom.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .score_nets import timestep_embedding


def drop_labels(y: Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label of y (B,) by `null_label` with probability p (label dropout for CFG training).

    Called explicitly by the training step, never inside `forward`, so evaluating a net that is still in train
    mode (e.g. inside the DM loss) uses the labels it is given. `generator` must live on y.device.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must lie in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return y.masked_fill(drop, null_label)


POS_EMBED_ORDERS = ("row_col", "col_row")  # which coordinate the first half of the position table codes


def sincos_pos_embed_2d(dim: int, grid: int, order: str = "row_col") -> Tensor:
    """Fixed 2-D sin-cos embedding (grid², dim) for row-major tokens: with order "row_col" dims [0, dim/2)
    code the row and the rest the column ("col_row": the other way round, as the reference); each half is
    [sin, cos] of pos·10000^(−4i/dim)."""
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    if order not in POS_EMBED_ORDERS:
        raise ValueError(f"pos_embed_order {order!r} unknown; use one of {', '.join(POS_EMBED_ORDERS)}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    rows, cols = (a.reshape(-1) for a in torch.meshgrid(pos, pos, indexing="ij"))  # (grid²,) each

    def embed(coord: Tensor) -> Tensor:
        angle = coord[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # sin then cos, (grid², dim/2)

    first, second = (rows, cols) if order == "row_col" else (cols, rows)
    return torch.cat([embed(first), embed(second)], dim=1)


def rope_angles(head_dim: int, rows: Tensor, cols: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotation angles (N, head_dim/2) for tokens at integer positions (rows, cols), each (N,)."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be divisible by 4 for 2-D RoPE, got {head_dim}")
    quarter = head_dim // 4  # rotation pairs per axis
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # θ^(−4i/d_h)
    return torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (..., N, head_dim) by the angles of cos, sin (N, head_dim/2), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, head_dim/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1 + scale) + shift; x (B, N, D), shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last dim, computed in fp32 and returned in x's dtype (bf16-safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """(B, N, D) -> (B, N, D): W₃(silu(a) ⊙ b) with (a, b) = W₁₂ x."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v by SDPA. On the CPU in bf16 its math backend: the CPU flash kernel's bf16 backward
    is 1.4–3.7× slower at 4–64 tokens (benchmarks/attention.py), the token counts of the CPU presets."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention (B, N, D) -> (B, N, D) with optional QK-RMSNorm and RoPE."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; x (B, N, D), c (B, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c)[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """(B, N, D), c (B, D) -> (B, N, p²·C): RMSNorm, adaLN shift/scale, Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LightningDiT(nn.Module):
    """Velocity net v(x_t, t, y) on (B, C, H, W) latents with H = W = input_size (see the module docstring).

    num_classes = 0 builds an unconditional net (no label table; passing y raises). Otherwise y = None means
    the null label `self.null_label` = num_classes.
    """

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        hidden: int,
        depth: int,
        heads: int,
        num_classes: int,
        patch_size: int = 1,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        rope: bool = True,
        grad_checkpoint: bool = False,
        time_scale: float = 1000.0,  # sinusoid of time_scale·t; 1.0 = reference (module docstring)
        freq_dim: int = 256,
        pos_embed_order: str = "row_col",  # "col_row" = reference (module docstring)
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.num_classes, self.grad_checkpoint = num_classes, grad_checkpoint
        self.time_scale, self.freq_dim, self.pos_embed_order = time_scale, freq_dim, pos_embed_order
        grid = input_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # num_classes + 1 rows: the last one is the null label (classifier-free guidance).
        self.y_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final = FinalLayer(hidden, patch_size**2 * in_channels)

        # Fixed tables: functions of the constructor args, so they are rebuilt, not saved (persistent=False).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid, pos_embed_order)[None],
                             persistent=False)
        self.rope = rope
        if rope:
            pos = torch.arange(grid)
            rows, cols = (a.reshape(-1) for a in torch.meshgrid(pos, pos, indexing="ij"))
            angles = rope_angles(hidden // heads, rows, cols)  # (N, hd/2)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.reset_parameters()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def reset_parameters(self) -> None:
        """adaLN-Zero init; afterwards forward returns exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        zero = [blk.adaLN[-1] for blk in self.blocks] + [self.final.adaLN[-1], self.final.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p²·C) -> (B, C, H, W)."""
        p, grid = self.patch_size, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], grid, grid, p, p, self.in_channels)  # (B, h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], self.in_channels, grid * p, grid * p)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x_t (B, C, H, W), t (B,) or scalar in [0, 1], y (B,) long or None -> v (B, C, H, W)."""
        B = x_t.shape[0]
        if tuple(x_t.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"expected x_t of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x_t.shape)}"
            )
        t = t.expand(B) if t.dim() == 0 else t
        c = self.t_mlp(timestep_embedding(t, self.freq_dim, scale=self.time_scale))  # (B, D)
        if self.y_embed is not None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x_t.device) if y is None else y
            c = c + self.y_embed(y)
        elif y is not None:
            raise ValueError("this LightningDiT is unconditional (num_classes=0); call it with y=None")

        # (B, N, D), row-major tokens. Contiguous: the transposed view's strides would otherwise carry through
        # every elementwise op of the residual stream, and nn.Linear on such an input falls back to a batched
        # matmul with the weight expanded per sample (≈ 2× slower in bf16 than fp32 on the CPU; benchmarks/)
        x = (self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed).contiguous()
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        return self.unpatchify(self.final(x, c))


# name -> (depth, hidden, heads). Parameter counts at in_channels 32, 16×16 latent, 1000 classes, patch 1
# (buffers excluded): Mini 7.6 M, S 32.9 M, B 130.4 M, L 457.9 M, XL 675.0 M (the DMVAE teacher/fake net).
# "tiny" is for unit tests; "Nano" (0.8 M) and "Micro" (2.8 M at 8×8×4, 10 classes) sit below Mini for CPU
# presets (the `cpu` preset runs Nano at patch 2: 16 tokens on an 8×8 latent grid).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "Nano": (4, 128, 2),
    "Micro": (4, 192, 3),
    "Mini": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def lightning_dit(
    size: str, *, input_size: int, in_channels: int, num_classes: int, patch_size: int = 1, **kw
) -> LightningDiT:
    """Build a LightningDiT of a named size from `DIT_SIZES`; extra keywords go to the constructor."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown LightningDiT size {size!r}; known sizes: {', '.join(DIT_SIZES)}")
    depth, hidden, heads = DIT_SIZES[size]
    return LightningDiT(
        input_size=input_size, in_channels=in_channels, hidden=hidden, depth=depth, heads=heads,
        num_classes=num_classes, patch_size=patch_size, **kw,
    )  # fmt: skip
