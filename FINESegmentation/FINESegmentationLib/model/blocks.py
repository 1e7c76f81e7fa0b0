"""FINE transformer blocks (one FINE block = eq. 1 of the paper).

Paper symbols: u visual tokens, v window tokens, w volume tokens. In the code the
visual tokens are ``x``, the window tokens ``win`` and the volume tokens ``vol``
to avoid clashing with attention's q/k/v.

Shapes: visual tokens are channels-last grids (B, Z, Y, X, C); window tokens
(B, nW, Nv, C); volume tokens (B, M, Nw, C); crop cells (B, K).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import Tensor, nn

# Additive mask for token pairs across a shifted-window seam (as in Swin).
_SHIFT_MASK_VALUE = -100.0


class Attention(nn.Module):
    """Multi-head self-attention over the last-but-one axis.

    x: (..., L, C) -> (..., L, C). ``mask`` broadcasts to (..., heads, L, L): a float
    mask is added to the logits, a boolean mask keeps True entries.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        *lead, length, dim = x.shape
        qkv = self.qkv(x).reshape(*lead, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.movedim(-3, 0).transpose(-2, -3).unbind(0)  # each (..., heads, L, d)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(-2, -3).reshape(*lead, length, dim))


def relative_position_index(window: tuple[int, int, int]) -> Tensor:
    """(Nu, Nu) index into a ((2wz-1)(2wy-1)(2wx-1)) bias table, as in Swin."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel += torch.tensor([w - 1 for w in window])
    return rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1) + rel[..., 1] * (2 * window[2] - 1) + rel[..., 2]


class WindowAttention(nn.Module):
    """W-MSA over [window tokens; visual tokens] of every window (eq. 1, first line).

    The relative position bias and the shift mask act on the visual-visual block only;
    window tokens attend and are attended without bias.
    """

    def __init__(self, dim: int, window: tuple[int, int, int], num_heads: int, num_window_tokens: int) -> None:
        super().__init__()
        self.window = window
        self.num_window_tokens = num_window_tokens
        self.attn = Attention(dim, num_heads)
        self.bias_table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1), num_heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """x: (B, nW, Nv + Nu, C); shift_mask: (nW, Nu, Nu) or None."""
        nu = self.bias_index.shape[0]
        mask = self.bias_table[self.bias_index.reshape(-1)].reshape(nu, nu, -1).permute(2, 0, 1)[None]
        if shift_mask is not None:
            mask = mask + shift_mask[:, None]
        t = self.num_window_tokens
        if t:
            mask = F.pad(mask, (t, 0, t, 0))
        return self.attn(x, mask)


def shift_mask(resolution: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]) -> Tensor:
    """(nW, Nu, Nu) additive mask that keeps shifted windows from mixing across the roll seam."""
    region = torch.zeros(resolution)
    count = 0
    slices = [
        (slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)
        for w, s in zip(window, shift)
    ]
    for sz, sy, sx in itertools.product(*slices):
        region[sz, sy, sx] = count
        count += 1
    ids = rearrange(region, "(z a) (y b) (x c) -> (z y x) (a b c)", a=window[0], b=window[1], c=window[2])
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, torch.tensor(_SHIFT_MASK_VALUE), torch.tensor(0.0))


class FINEBlock(nn.Module):
    """One FINE transformer block (eq. 1):

    1. W-MSA over [v; u] in every (optionally shifted) window -> u, v-hat
    2. window tokens:  v <- v + v-hat;  v <- v + MLP(LN2(v))   (the block's own LN2/MLP)
    3. G-MSA over [w_cap; v + P]: the crop's volume tokens and all its window tokens
    4. write back:  w[cells] <- w[cells] + w_cap'
    5. MSA over all volume tokens, keys of never-visited cells masked (the warm-up)
    6. visual tokens as in Swin: u <- u + attn;  u <- u + MLP(LN2(u))

    Steps 3 and 5 have no residual and no norm, as in the authors' code.
    With window tokens off this is a Swin/nnFormer block; with volume tokens off,
    G-MSA runs over the window tokens alone.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int, int],
        num_heads: int,
        window: tuple[int, int, int],
        shifted: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        num_window_tokens: int = 1,
        volume_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.shift = tuple(w // 2 if shifted and r > w else 0 for r, w in zip(resolution, window))
        self.num_window_tokens = num_window_tokens
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, num_window_tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=0.0, act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.global_attn = Attention(dim, num_heads) if num_window_tokens else None  # G-MSA
        self.volume_attn = Attention(dim, num_heads) if volume_tokens else None  # MSA over volume tokens
        if any(self.shift):
            self.register_buffer("shift_mask", shift_mask(resolution, window, self.shift), persistent=False)
        else:
            self.shift_mask = None

    def forward(
        self,
        x: Tensor,
        win: Tensor | None = None,
        vol: Tensor | None = None,
        cells: Tensor | None = None,
        window_pos: Tensor | None = None,
        seen: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B,Z,Y,X,C); win (B,nW,Nv,C); vol (B,M,Nw,C); cells (B,K); window_pos (nW,C); seen (B,M) bool."""
        b, nz, ny, nx, c = x.shape
        wz, wy, wx = self.window
        shortcut = x
        h = self.norm1(x)
        if any(self.shift):
            h = torch.roll(h, shifts=tuple(-s for s in self.shift), dims=(1, 2, 3))
        h = rearrange(h, "b (z a) (y p) (x q) c -> b (z y x) (a p q) c", a=wz, p=wy, q=wx)
        t = self.num_window_tokens
        if t:
            h = torch.cat([win, h], dim=2)
        h = self.attn(h, self.shift_mask)
        if t:
            win = win + h[:, :, :t]
            win = win + self.mlp(self.norm2(win))
            h = h[:, :, t:]
            win, vol = self._global(win, vol, cells, window_pos, seen)
        h = rearrange(h, "b (z y x) (a p q) c -> b (z a) (y p) (x q) c", z=nz // wz, y=ny // wy, a=wz, p=wy, q=wx)
        if any(self.shift):
            h = torch.roll(h, shifts=self.shift, dims=(1, 2, 3))
        x = shortcut + self.drop_path(h)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, win, vol

    def _global(self, win: Tensor, vol: Tensor | None, cells: Tensor | None, window_pos: Tensor, seen: Tensor | None) -> tuple[Tensor, Tensor | None]:
        b, nw, nv, c = win.shape
        seq = (win + window_pos[None, :, None]).reshape(b, nw * nv, c)
        if self.volume_attn is None:
            return self.global_attn(seq).reshape(b, nw, nv, c), None
        nvol = vol.shape[2]
        k = cells.shape[1]
        index = cells[:, :, None, None].expand(-1, -1, nvol, c)
        crop_vol = torch.gather(vol, 1, index).reshape(b, k * nvol, c)
        out = self.global_attn(torch.cat([crop_vol, seq], dim=1))
        win = out[:, k * nvol :].reshape(b, nw, nv, c)
        vol = vol.scatter_add(1, index, out[:, : k * nvol].reshape(b, k, nvol, c))
        m = vol.shape[1]
        keys = seen.repeat_interleave(nvol, dim=1)[:, None, None, :]  # (B, 1, 1, M*Nw)
        vol = self.volume_attn(vol.reshape(b, m * nvol, c), keys).reshape(b, m, nvol, c)
        return win, vol
