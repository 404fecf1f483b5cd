"""The PixelFlow transformer: pixels in, velocity out.

A DiT-style network on p x p pixel patches with adaLN-Zero conditioning on model time, class label and the
token-grid side, 2D RoPE in every attention, and (for text-to-image) cross-attention to text features.
It knows nothing about stages, noise or guidance: that is pixelflow.scheduler and pixelflow.pipeline.

State-dict names match the released checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .attention import Attention, PackedLayout, RMSNorm, gate, make_packed_layout, modulate
from .embeddings import ScalarEmbedder, rope_2d

LAYER_NORM_EPS = 1e-6
TEXT_MASK_BIAS = -10000.0  # added to the scores of padded text tokens, as the release does


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p): tokens row-major, features (channel, row-in-patch, col-in-patch)."""
    p = patch_size
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class PatchEmbed(nn.Module):
    """p x p patches with stride p -> D channels. Stored as the release's Conv2d weight, applied as a
    Linear over each patch flattened in (channel, row-in-patch, col-in-patch) order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (..., C * p * p) -> (..., D)."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows; row num_classes is the null label used for guidance and label dropout."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B,) long in [0, num_classes] -> (B, D)."""
        return self.embedding_table(labels)


class AdaLNModulation(nn.Module):
    """Linear(SiLU(c)) -> 6D: shift1, scale1, gate1, shift2, scale2, gate2 (in this order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (B, D) -> six (B, D) float32 tensors (the modulation stays in float32 under autocast)."""
        return self.linear(F.silu(c)).float().chunk(6, dim=-1)


class FeedForward(nn.Module):
    """fc2(GELU_tanh(fc1(x))), hidden width mult * D."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PixelFlowBlock(nn.Module):
    """adaLN-Zero transformer block: LayerNorm + modulation -> self-attention (RoPE) -> gated residual;
    for text-to-image, RMSNorm -> cross-attention to the text -> residual; RMSNorm + modulation -> MLP ->
    gated residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int | None, bias: bool):
        super().__init__()
        self.norm1 = AdaLNModulation(dim)
        self.attn1 = Attention(dim, heads, head_dim, bias=bias)
        if cross_attention_dim is not None:
            self.norm2 = RMSNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, kv_dim=cross_attention_dim, bias=bias)
        self.norm3 = RMSNorm(dim)
        self.mlp = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: torch.Tensor,
        layout: PackedLayout | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, D) or packed (L, D); c: (B, D), one conditioning vector per image."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(c)
        h = F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)
        h = self.attn1(modulate(h, shift1, scale1, layout).to(x.dtype), rope, layout)
        x = x + gate(h, gate1, layout).to(x.dtype)
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), rope, layout, context, context_mask)
        h = self.mlp(modulate(self.norm3(x), shift2, scale2, layout).to(x.dtype))
        return x + gate(h, gate2, layout).to(x.dtype)


class PixelFlowModel(nn.Module):
    """PixelFlow DiT. Keyword names are those of the released config.yaml (model.params)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        depth: int = 28,
        patch_size: int = 4,
        num_classes: int = 0,
        cross_attention_dim: int | None = None,
        attention_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_attention_heads", num_attention_heads), ("attention_head_dim", attention_head_dim),
                            ("depth", depth), ("patch_size", patch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if attention_head_dim % 4:
            raise ValueError(f"attention_head_dim must be divisible by 4 for 2D RoPE, got {attention_head_dim}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no class conditioning), got {num_classes}")
        if cross_attention_dim is not None and (not isinstance(cross_attention_dim, int) or cross_attention_dim < 1):
            raise ValueError(f"cross_attention_dim must be a positive int or None, got {cross_attention_dim!r}")
        if dropout:
            raise ValueError(f"dropout is not supported (the release trains without it), got {dropout}")
        dim = num_attention_heads * attention_head_dim
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_attention_heads, self.attention_head_dim = num_attention_heads, attention_head_dim
        self.patch_size, self.num_classes, self.cross_attention_dim = patch_size, num_classes, cross_attention_dim
        self.null_label = num_classes
        self.hidden_size = dim

        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.timestep_embedder = ScalarEmbedder(dim)
        self.latent_size_embedder = ScalarEmbedder(dim)
        if num_classes > 0:
            self.class_embedder = LabelEmbedder(num_classes, dim)
        self.transformer_blocks = nn.ModuleList([
            PixelFlowBlock(dim, num_attention_heads, attention_head_dim, cross_attention_dim, attention_bias)
            for _ in range(depth)
        ])
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * out_channels)
        self._rope_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """From-scratch init: xavier Linear with zero bias, N(0, 0.02) embedders, zeroed adaLN and output."""
        if next(self.parameters()).is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for embedder in (self.timestep_embedder, self.latent_size_embedder):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
        if self.num_classes > 0:
            nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ helpers
    def rope_table(self, grid_h: int, grid_w: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """(grid_h * grid_w, head_dim, 2) float32 RoPE table, cached per grid and device, and apart for
        inference_mode (a table made there could not be saved for a later backward)."""
        grid_w = grid_h if grid_w is None else grid_w
        device = torch.device(device) if device is not None else self.proj_out_2.weight.device
        key = (grid_h, grid_w, device, torch.is_inference_mode_enabled())
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_2d(grid_h, grid_w, self.attention_head_dim, device=device)
            self._rope_cache[key] = table
        return table

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, C * p * p) tokens, row-major, features (channel, row, col)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) with features (row, col, channel) as the output head emits them -> (B, C, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        b = tokens.shape[0]
        x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h * p, w * p)

    def conditioning(self, timestep: torch.Tensor, grid_side: torch.Tensor, class_labels: torch.Tensor | None,
                     batch: int, dtype: torch.dtype) -> torch.Tensor:
        """c = MLP(sin(T)) + class embedding + MLP(sin(grid side)): (batch, D)."""
        timestep = torch.as_tensor(timestep, device=grid_side.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if tuple(timestep.shape) != (batch,):
            raise ValueError(f"timestep must be a scalar or ({batch},) for {batch} images, got {tuple(timestep.shape)}")
        c = self.timestep_embedder(timestep).to(dtype)
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels (B,) long "
                                 f"(use {self.null_label} for the null label)")
            class_labels = torch.as_tensor(class_labels)
            if tuple(class_labels.shape) != (batch,) or class_labels.is_floating_point() \
                    or class_labels.dtype == torch.bool:
                raise ValueError(f"class_labels must be ({batch},) integers for {batch} images, got "
                                 f"{tuple(class_labels.shape)} {class_labels.dtype}")
            if class_labels.device.type == "cpu":  # elsewhere a sync per call; the pipeline checks first
                bad = class_labels[(class_labels < 0) | (class_labels > self.null_label)]
                if bad.numel():
                    raise ValueError(f"class label {bad[0].item()} is outside [0, {self.null_label}] "
                                     f"({self.num_classes} classes; {self.null_label} is the null label)")
            c = c + self.class_embedder(class_labels.to(grid_side.device).long()).to(dtype)
        elif class_labels is not None:
            raise ValueError("this model is text-conditional (num_classes 0): pass encoder_hidden_states, "
                             "not class_labels")
        return c + self.latent_size_embedder(grid_side).to(dtype)

    def check_text_inputs(self, encoder_hidden_states: torch.Tensor | None,
                          encoder_attention_mask: torch.Tensor | None = None) -> None:
        if self.cross_attention_dim is not None and encoder_hidden_states is None:
            raise ValueError("this model is text-conditional: pass encoder_hidden_states (B, Lt, "
                             f"{self.cross_attention_dim})")
        if self.cross_attention_dim is None and encoder_hidden_states is not None:
            raise ValueError("this model is class-conditional (no cross-attention): encoder_hidden_states "
                             "would be ignored; pass class_labels")
        if self.cross_attention_dim is None and encoder_attention_mask is not None:
            raise ValueError("this model is class-conditional (no cross-attention): encoder_attention_mask "
                             "would be ignored; pass class_labels")

    def _text_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None:
            return None
        # 1 = keep, 0 = padding -> additive bias on the attention scores, (B, 1, 1, Lt).
        return ((1 - mask.to(dtype)) * TEXT_MASK_BIAS)[:, None, None, :]

    def final_layer(self, tokens: torch.Tensor, c: torch.Tensor, layout: PackedLayout | None = None) -> torch.Tensor:
        """Output head: LayerNorm(x) * (1 + scale) + shift, then Linear(D, p*p*C).

        tokens: (B, N, D) or packed (L, D); c: (B, D). Returns (B, N, p*p*C) or (L, p*p*C), features ordered
        (row-in-patch, col-in-patch, channel).
        """
        shift, scale = self.proj_out_1(F.silu(c)).float().chunk(2, dim=-1)
        h = F.layer_norm(tokens, (tokens.shape[-1],), eps=LAYER_NORM_EPS)
        return self.proj_out_2(modulate(h, shift, scale, layout).to(tokens.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        grid_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """Velocity for images in [-1, 1] at model time T in [0, 1000).

        Dense: hidden_states (B, C, H, W) -> (B, C, H, W).
        Packed (grid_sizes given): hidden_states (L, C*p*p) tokens of images with token grids
        grid_sizes[i] x grid_sizes[i], features ordered (channel, row-in-patch, col-in-patch); each image
        attends only to itself; returns (L, C*p*p) in the same order.
        timestep: (B,) or scalar model time; class_labels: (B,) long, num_classes = null label.
        encoder_hidden_states: (B, Lt, cross_attention_dim); encoder_attention_mask: (B, Lt), 1 = keep.
        """
        x = hidden_states
        self.check_text_inputs(encoder_hidden_states, encoder_attention_mask)
        context_mask = self._text_mask(encoder_attention_mask, x.dtype if x.is_floating_point() else torch.float32)

        if grid_sizes is None:
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"expected hidden_states (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
            b, _, height, width = x.shape
            p = self.patch_size
            if height % p or width % p:
                raise ValueError(f"image size {height}x{width} is not divisible by patch_size {p}")
            gh, gw = height // p, width // p
            layout, rope = None, self.rope_table(gh, gw, x.device)
            tokens = self.patch_embed(self.patchify(x))
            # As the release (its pipeline passes latents.shape[-1] // patch_size): the grid-side embedding takes
            # the token-grid width. SPEC's "H/p" is the same number for the square images the release samples.
            grid_side = torch.full((1,), gw, device=x.device)
        else:
            b = len(grid_sizes)
            layout = make_packed_layout(grid_sizes, lambda g: self.rope_table(g, g, x.device), x.device)
            if x.ndim != 2 or x.shape[0] != layout.num_tokens:
                raise ValueError(f"packed hidden_states must be ({layout.num_tokens}, C*p*p) for grid_sizes "
                                 f"{list(grid_sizes)}, got {tuple(x.shape)}")
            rope = layout.rope
            tokens = self.patch_embed(x)
            grid_side = torch.tensor(layout.grid_sizes, device=x.device)

        c = self.conditioning(timestep, grid_side, class_labels, b, tokens.dtype)
        for block in self.transformer_blocks:
            tokens = block(tokens, c, rope, layout, encoder_hidden_states, context_mask)

        out = self.final_layer(tokens, c, layout)

        if layout is None:
            return self.unpatchify(out, gh, gw)
        p, ch = self.patch_size, self.out_channels
        # The head emits (row, col, channel); packed targets are (channel, row, col).
        return out.unflatten(-1, (p, p, ch)).permute(0, 3, 1, 2).flatten(1)
