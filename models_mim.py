"""Pre-training models on one masked ViT encoder.

LocalMIM (Wang et al., CVPR 2023): light decoders tapped from several encoder
blocks each predict HOG features of the masked region at their own scale.
MAE (He et al., CVPR 2022): one decoder after the last block predicts pixels.
Encoder parameter names equal timm's VisionTransformer, so fine-tuning and
timm load the encoder directly.
Above both model families: the registry of every pre-training model (this
module's and models_swin's), `build` from a run's flags, and the loading of
checkpoints in this project's layout or the originals'.
"""
import argparse
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import LayerNorm2d, PatchEmbed
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block

import models_swin
from models_common import (LayerNorm, gather_kept, init_weights, kept_units, localmim_loss, masked_mse, patchify,
                           per_mask, tap_loss_weights, unpatchify)
from util.checkpoint import saved_run_args
from util.errors import UsageError
from util.hog import HOGTarget
from util.pos_embed import get_2d_sincos_pos_embed, rope_table

# LocalMIM paper: scale of each tap's prediction grid relative to the token grid, lower layers finer
LOCALMIM_SCALES = (4, 2, 1, 0.5)


def default_taps(depth):
    """LocalMIM's tapped blocks (0-based): 1, 3, depth-3, depth-1 (ViT-B: 1, 3, 9, 11)."""
    return [1, 3, depth - 3, depth - 1]


POS_EMBEDS = ('sincos', 'rope')


def transformer_block(dim, num_heads, mlp_ratio=4., rope=False, layer_scale=None):
    """timm's ViT block, or with --pos_embed rope timm's EVA block with rotary attention (its RoPE-ViT models'
    block: the same parameter names, LayerScale as gamma_1/gamma_2), whose forward takes `rope=` the table."""
    if rope:
        return EvaBlock(dim, num_heads, qkv_bias=True, mlp_ratio=mlp_ratio, attn_type='rope', num_prefix_tokens=1,
                        norm_layer=LayerNorm, init_values=layer_scale)
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, init_values=layer_scale)


def position_tables(module, dim, num_heads, grid_size, kind, prefix=''):
    """Register the position buffers of a token grid with a cls token: `<prefix>pos_embed` the fixed
    (1, 1+L, dim) sin-cos table added to the tokens (None with rope), `<prefix>rope` the rotary
    (L, 2 dim/heads) table (None with sincos). The rotary table is rebuilt, not saved: any grid size loads."""
    if kind not in POS_EMBEDS:
        raise ValueError(f"--pos_embed must be one of {POS_EMBEDS}, got {kind!r}")
    sincos = get_2d_sincos_pos_embed(dim, grid_size, True).unsqueeze(0) if kind == 'sincos' else None
    module.register_buffer(f'{prefix}pos_embed', sincos)
    module.register_buffer(f'{prefix}rope', rope_table(dim, num_heads, grid_size) if kind == 'rope' else None,
                           persistent=False)


def rope_arg(table):
    """The keyword that passes a rotary table to transformer_block's forward: none with sin-cos."""
    return {} if table is None else {'rope': table}


def random_masking(x, mask_ratio, noise=None):
    """Per-sample MAE masking: keep the tokens of lowest noise. x: (B, L, D) -> kept tokens (B, L_keep, D),
    mask (B, L) with 1 = masked, ids_restore (B, L), ids_keep (B, L_keep) the grid position of each kept token.
    `noise` (B, L) comes from the data pipeline, where it is seeded per sample; drawn here when None. With
    noise (B, K, L), K masks of each crop (--masks_per_image): every output is per masked sample (B x K, ...),
    its kept tokens gathered from the crop's one embedding."""
    B, L = x.shape[:2]
    len_keep = kept_units(L, mask_ratio)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    noise = noise.flatten(0, -2)  # (B x K, L) with K masks of each crop, next to each other
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = gather_kept(x, ids_keep)  # (B x K, L_keep, D)
    mask = torch.ones(noise.shape[0], L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def unshuffle_with_mask_tokens(x, mask_token, ids_restore):
    """x: (B, 1+L_keep, D) with cls first -> (B, 1+L, D) in image order, mask tokens at masked positions."""
    B, n_visible, D = x.shape
    L = ids_restore.shape[1]
    tokens = torch.cat([x[:, 1:], mask_token.expand(B, L + 1 - n_visible, -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1], tokens], dim=1)


class MaskedViT(nn.Module):
    """ViT encoder with MAE random masking and a FreezeOut-aware forward."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., cls_token_in_unit0=True, grad_ckpt=False, layer_scale=None, pos_embed='sincos'):
        super().__init__()
        # FreezeOut: the cls token freezes with the patch embedding (this project's rules), or is no unit and
        # keeps training (utkutpcgl/freezeout_localmim_rho), so that backward runs through frozen blocks
        self.cls_token_in_unit0 = cls_token_in_unit0
        # --grad_ckpt: the blocks that train keep only their input for backward and recompute the rest
        self.grad_ckpt = grad_ckpt
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_kind = pos_embed
        position_tables(self, embed_dim, num_heads, self.grid_size, pos_embed)
        self.blocks = nn.ModuleList([  # layer_scale: timm's LayerScale (init_values), as in CaiT
            transformer_block(embed_dim, num_heads, mlp_ratio, pos_embed == 'rope', layer_scale)
            for _ in range(depth)])
        # FreezeOut units (0 = patch embedding + cls token, i = block i-1) that are frozen, and the length of
        # the frozen prefix, which runs without autograd
        self.frozen, self.no_grad_units = set(), 0

    @property
    def num_units(self):
        return 1 + len(self.blocks)

    @property
    def num_mask_units(self):
        return self.patch_embed.num_patches

    def unit_modules(self, unit):
        return [self.patch_embed] if unit == 0 else [self.blocks[unit - 1]]

    def compile_regions(self):
        """What --compile_scope blocks compiles, each on its own (util.distributed.compile_model)."""
        return list(self.blocks)

    def unit_of(self, param_name):
        """FreezeOut unit of an encoder parameter, None for parameters outside the units (decoders, norms)."""
        if param_name.startswith('patch_embed.') or (param_name == 'cls_token' and self.cls_token_in_unit0):
            return 0
        if param_name.startswith('blocks.'):
            return int(param_name.split('.')[1]) + 1
        return None

    @property
    def frozen_units(self):
        return len(self.frozen)

    def set_frozen(self, units):
        """Freeze these units: no gradient, no optimizer update (AdamW skips grad=None), no weight decay.
        The frozen prefix runs without autograd; a frozen block behind a trainable unit (--dont_freeze_pe)
        must still pass gradients back, so it only skips its weight gradients; so must every frozen block
        when the cls token is no unit (it joins the tokens before block 0)."""
        self.frozen = set(units)
        self.no_grad_units = next(u for u in range(self.num_units + 1) if u not in self.frozen)
        if not self.cls_token_in_unit0:
            self.no_grad_units = min(self.no_grad_units, 1)
        for unit in range(self.num_units):
            params = [p for m in self.unit_modules(unit) for p in m.parameters()]
            if unit == 0 and self.cls_token_in_unit0:
                params.append(self.cls_token)
            for p in params:
                p.requires_grad_(unit not in self.frozen)
                if unit in self.frozen:
                    p.grad = None

    def forward_encoder(self, imgs, mask_ratio, keep_blocks, noise=None):
        """Returns {block index: (B, 1+L_keep, D) output} for `keep_blocks`, the mask (B, L) and ids_restore."""
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.no_grad_units == 0):
            x = self.patch_embed(imgs)
            if self.pos_embed is not None:
                x = x + self.pos_embed[:, 1:]
            x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise)
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # the cls token trains unless frozen
        rope = None
        if self.rope is not None:  # each kept token rotates by its own grid position: (B, 1, L_keep, 2 dim/heads)
            rope = self.rope[ids_keep].unsqueeze(1)
        outputs = {}
        for i, blk in enumerate(self.blocks):
            with torch.set_grad_enabled(grad and i + 1 >= self.no_grad_units):
                if self.grad_ckpt and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **rope_arg(rope))
                else:
                    x = blk(x, **rope_arg(rope))
            if i in keep_blocks:
                outputs[i] = x
        return outputs, mask, ids_restore


def _upsampling_head(scale, dim):
    """Conv head from the (B, dim, h, w) token grid to the (h*scale, w*scale) prediction grid; returns
    the head and its output width. The per-cell linear layer that follows is the paper's 1x1 conv."""
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.AvgPool2d(2), dim
    raise ValueError(f"LocalMIM scale must be one of {LOCALMIM_SCALES}, got {scale}")


class ScaleDecoder(nn.Module):
    """One LocalMIM decoder: one transformer block on the full token grid, then a conv head to its scale."""

    def __init__(self, embed_dim, dim, num_heads, grid_size, scale, out_dim, pos_embed='sincos'):
        super().__init__()
        self.grid_size, self.scale = grid_size, scale
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        position_tables(self, dim, num_heads, grid_size, pos_embed)
        self.block = transformer_block(dim, num_heads, rope=pos_embed == 'rope')
        self.norm = LayerNorm(dim)
        self.head, width = _upsampling_head(scale, dim)
        self.pred = nn.Linear(width, out_dim)

    def forward(self, x, ids_restore):
        x = unshuffle_with_mask_tokens(self.embed(x), self.mask_token, ids_restore)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.norm(self.block(x, **rope_arg(self.rope)))[:, 1:]  # drop cls: (B, L, dim)
        B, L, D = x.shape
        x = x.transpose(1, 2).reshape(B, D, self.grid_size, self.grid_size)
        x = self.head(x).flatten(2).transpose(1, 2)  # (B, (h*scale)*(w*scale), width), row-major cells
        return self.pred(x)


class LocalMIM(MaskedViT):
    def __init__(self, decoder_dim=256, decoder_heads=8, taps=None, scales=LOCALMIM_SCALES, all_stages=False,
                 loss_weights='uniform', hog_nbins=9, hog_bias=False, freeze_decoders=False, **kwargs):
        super().__init__(**kwargs)
        depth, embed_dim = len(self.blocks), self.cls_token.shape[-1]
        patch = self.patch_embed.patch_size[0]
        if all_stages:  # a decoder on every block; the scales in order over consecutive groups of blocks
            taps, scales = list(range(depth)), [scales[len(scales) * b // depth] for b in range(depth)]
        self.taps = list(taps) if taps is not None else default_taps(depth)
        self.scales = list(scales)
        self.loss_weights = tap_loss_weights(loss_weights, len(self.taps))
        if depth < 4 or len(self.taps) != len(self.scales) or not all(0 <= b < depth for b in self.taps):
            raise ValueError(f"taps {self.taps} and scales {self.scales} do not fit an encoder of depth {depth}")
        if self.grid_size % 2:
            raise ValueError(f"LocalMIM needs an even token grid, got {self.grid_size}x{self.grid_size}: "
                             f"pick --input_size as an even multiple of the patch size {patch}")
        cell_sizes = [patch / s for s in self.scales]
        if any(c != int(c) for c in cell_sizes):
            raise ValueError(f"HOG cell sizes {cell_sizes} (patch {patch} / scale) must be whole pixels")
        self.freeze_decoders = freeze_decoders
        self.tap_norms = nn.ModuleList([LayerNorm(embed_dim) for _ in self.taps])
        self.decoders = nn.ModuleList([
            ScaleDecoder(embed_dim, decoder_dim, decoder_heads, self.grid_size, s, 3 * hog_nbins, self.pos_embed_kind)
            for s in self.scales])
        self.hog = HOGTarget(hog_nbins, [int(c) for c in cell_sizes], hog_bias)
        init_weights(self)

    def loss_names(self):
        return [f'loss_blk{b}_x{s:g}' for b, s in zip(self.taps, self.scales)]

    def compile_regions(self):
        return super().compile_regions() + list(self.decoders) + [self.hog]

    def active_taps(self):
        """Indices of the taps trained now: with --freeze_decoders, taps inside the frozen prefix are dropped."""
        if not self.freeze_decoders:
            return list(range(len(self.taps)))
        return [k for k, b in enumerate(self.taps) if b + 1 not in self.frozen]

    def set_frozen(self, units):
        super().set_frozen(units)
        active = set(self.active_taps())
        for k in range(len(self.taps)):
            for p in list(self.decoders[k].parameters()) + list(self.tap_norms[k].parameters()):
                p.requires_grad_(k in active)
                if k not in active:
                    p.grad = None

    def scale_mask(self, mask, scale):
        """Token mask (B, L) -> cell weights at `scale`: repeated to sub-cells, or averaged over 2x2 tokens."""
        B, g = mask.shape[0], self.grid_size
        mask = mask.view(B, 1, g, g)
        if scale >= 1:
            s = int(scale)
            mask = mask.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
        else:
            mask = F.avg_pool2d(mask, round(1 / scale))
        return mask.flatten(1)

    def forward_predictions(self, imgs, mask_ratio, noise=None):
        """HOG targets, predictions and cell masks of the active taps: {k: (pred, target, weight)}, token mask."""
        targets = self.hog(imgs)  # once per crop, whatever its number of masks
        active = self.active_taps()
        feats, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, {self.taps[k] for k in active}, noise)
        masks = mask.shape[0] // imgs.shape[0]
        out = {}
        for k in active:
            pred = self.decoders[k](self.tap_norms[k](feats[self.taps[k]]), ids_restore)
            out[k] = per_mask(pred, targets[k], self.scale_mask(mask, self.scales[k]), masks)
        return out, mask

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return localmim_loss(self, imgs, mask_ratio, noise)


class MAE(MaskedViT):
    def __init__(self, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=False, **kwargs):
        super().__init__(**kwargs)
        embed_dim, patch = self.cls_token.shape[-1], self.patch_embed.patch_size[0]
        self.norm_pix_loss = norm_pix_loss
        self.norm = LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        position_tables(self, decoder_dim, decoder_heads, self.grid_size, self.pos_embed_kind, 'decoder_')
        self.decoder_blocks = nn.ModuleList([
            transformer_block(decoder_dim, decoder_heads, rope=self.pos_embed_kind == 'rope')
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
        init_weights(self)

    def loss_names(self):
        return ['loss_pix']

    def compile_regions(self):
        return super().compile_regions() + list(self.decoder_blocks)

    def patchify(self, imgs):
        return patchify(imgs, self.patch_embed.patch_size[0])

    def unpatchify(self, x):
        return unpatchify(x, self.patch_embed.patch_size[0])

    def forward_predictions(self, imgs, mask_ratio, noise=None):
        """Pixel predictions (B, L, p*p*3) and the mask (B, L)."""
        last = len(self.blocks) - 1
        feats, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, {last}, noise)
        x = self.decoder_embed(self.norm(feats[last]))
        x = unshuffle_with_mask_tokens(x, self.mask_token, ids_restore)
        if self.decoder_pos_embed is not None:
            x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x, **rope_arg(self.decoder_rope))
        return self.decoder_pred(self.decoder_norm(x))[:, 1:], mask

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        pred, mask = self.forward_predictions(imgs, mask_ratio, noise)
        target = self.patchify(imgs)  # once per crop, whatever its number of masks
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = masked_mse(*per_mask(pred, target, mask, mask.shape[0] // imgs.shape[0]))
        return loss, {'loss_pix': loss.detach()}


# Model zoo: (encoder width, depth, heads) from the ViT paper; tiny ones for CPU runs
_TINY = dict(embed_dim=192, depth=6, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(embed_dim=1280, depth=32, num_heads=16)
# Tiny decoders shrink in proportion so that the decoders stay lighter than a 192-d encoder
_TINY_MIM_DEC = dict(decoder_dim=128, decoder_heads=4)
_TINY_MAE_DEC = dict(decoder_dim=128, decoder_depth=4, decoder_heads=4)


def MIM_vit_tiny_patch4(**kw):
    return LocalMIM(**{'img_size': 32, 'patch_size': 4, **_TINY, **_TINY_MIM_DEC, **kw})


def MIM_vit_tiny_patch8(**kw):
    return LocalMIM(**{'img_size': 64, 'patch_size': 8, **_TINY, **_TINY_MIM_DEC, **kw})


def MIM_vit_small_patch16(**kw):
    return LocalMIM(**{'patch_size': 16, **_SMALL, **kw})


def MIM_vit_base_patch16(**kw):
    return LocalMIM(**{'patch_size': 16, **_BASE, **kw})


def MIM_vit_large_patch16(**kw):
    return LocalMIM(**{'patch_size': 16, **_LARGE, **kw})


def MIM_vit_huge_patch14(**kw):
    # 14 px patches have no 3.5 px cells: the finest tap predicts 7 px cells like the second
    return LocalMIM(**{'patch_size': 14, 'scales': (2, 2, 1, 0.5), **_HUGE, **kw})


def mae_vit_tiny_patch4(**kw):
    return MAE(**{'img_size': 32, 'patch_size': 4, **_TINY, **_TINY_MAE_DEC, **kw})


def mae_vit_tiny_patch8(**kw):
    return MAE(**{'img_size': 64, 'patch_size': 8, **_TINY, **_TINY_MAE_DEC, **kw})


def mae_vit_base_patch16(**kw):
    return MAE(**{'patch_size': 16, **_BASE, **kw})


def mae_vit_large_patch16(**kw):
    return MAE(**{'patch_size': 16, **_LARGE, **kw})


def mae_vit_huge_patch14(**kw):
    return MAE(**{'patch_size': 14, **_HUGE, **kw})


MODELS = {name: fn for name, fn in list(globals().items()) if name.startswith(('MIM_vit_', 'mae_vit_'))}


def all_models():
    """Every pre-training model by name: the ViT family here, the Swin family in models_swin."""
    return {**MODELS, **models_swin.MODELS}


ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'layers.')  # ViT and Swin


def is_localmim_layout(state):
    """Haoqing-Wang/LocalMIM's MaskedAutoencoderViT (also utkutpcgl/freezeout_localmim_rho's): per-tap
    `norm.<k>`, `decoder.<k>` (MAE_Decoder) and `hog_enc.<k>` (HOGLayer) modules."""
    return any(k.startswith(('decoder.0.', 'hog_enc.0.')) for k in state) and 'norm.0.weight' in state


def check_sobel(name, weight):
    """Haoqing-Wang/LocalMIM's HOG convolutions are fixed Sobel kernels; other weights would give other targets."""
    sobel_x = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    if not torch.equal(weight.float().cpu().view(2, 3, 3), torch.stack([sobel_x, sobel_x.t()])):
        raise UsageError(f"{name} is not the Sobel kernel pair that the HOG targets use; this codebase computes "
                         f"HOG with fixed Sobel kernels only: start from a checkpoint whose HOG layers are unchanged")


def from_released_layout(state):
    """(state dict in this project's names, HOG gradient biases or None) from a checkpoint in any layout:
    Haoqing-Wang/LocalMIM's ViT or Swin pre-training models are renamed, ours pass as they are."""
    for k, v in state.items():
        if k.startswith('hog_enc.') and k.endswith('conv.weight'):
            check_sobel(k, v)
    if is_localmim_layout(state):
        return from_localmim_layout(state)
    if models_swin.is_localmim_swin_layout(state):
        return models_swin.from_localmim_swin_layout(state)
    return state, None


def from_localmim_layout(state):
    """(state dict in this project's names, HOG gradient biases (scales, 2) or None) from Haoqing-Wang/LocalMIM's.
    Its MAE_Decoder keeps one Block in `blocks.0` and its head in one Sequential `pred`, whose last layer is
    the 1x1 conv that is our per-cell Linear; the layers before it are our `head` (a Sequential only at
    scale 4: transposed conv, LayerNorm, GELU, transposed conv)."""
    last_pred = {}
    for k in state:
        p = k.split('.')
        if p[0] == 'decoder' and p[2] == 'pred':
            last_pred[p[1]] = max(last_pred.get(p[1], 0), int(p[3]))
    out, hog_bias = {}, {}
    for k, v in state.items():
        p = k.split('.')
        if p[0] == 'norm' and p[1].isdigit():
            out[f'tap_norms.{p[1]}.{p[2]}'] = v
        elif p[0] == 'hog_enc':
            if p[-1] == 'bias':  # the Sobel weights are fixed; the optional bias (--hog_bias) was drawn at random
                hog_bias[int(p[1])] = v
        elif p[0] == 'decoder':
            dec, rest = f'decoders.{p[1]}', p[2:]
            if rest[0] == 'blocks':
                out['.'.join([dec, 'block', *rest[2:]])] = v
            elif rest[0] == 'pred':
                j, last = int(rest[1]), last_pred[p[1]]
                if j == last:
                    out[f'{dec}.pred.{rest[2]}'] = v.flatten(1) if rest[2] == 'weight' else v
                else:
                    out['.'.join([dec, 'head', *([rest[1]] if last == 4 else []), rest[2]])] = v
            else:
                out['.'.join([dec, *rest])] = v
        else:
            out[k] = v
    biases = torch.stack([hog_bias[k] for k in sorted(hog_bias)]) if hog_bias else None
    return out, biases


def load_weights(model, state):
    """Load a pre-training state dict, in this project's layout or Haoqing-Wang/LocalMIM's (or
    facebookresearch/mae's, whose names are ours), into `model`; one line names what does not fit."""
    state, hog_bias = from_released_layout(state)
    if hog_bias is not None and getattr(model, 'hog', None) is not None:
        if model.hog.grad_bias is None:
            raise UsageError("the checkpoint's HOG layers have a gradient bias: pass --hog_bias")
        state = {**state, 'hog.grad_bias': hog_bias}  # the original draws its biases at random: take the run's own
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    encoder_missing = [k for k in missing if k.startswith(ENCODER_KEYS)]
    if encoder_missing or unexpected or mismatched:
        raise UsageError(f"the checkpoint does not fit {type(model).__name__}: missing keys {missing[:6]}, "
                         f"unexpected keys {unexpected[:6]}, shape mismatches {mismatched[:4]}; check --model, "
                         f"--input_size and --pos_embed (or --hog_nbins, --hog_bias, --target)")
    if missing:  # an encoder-only checkpoint (facebookresearch/mae's mae_pretrain_vit_*.pth): fresh decoders
        print(f'newly initialised (not in the checkpoint): {missing}')
    model.load_state_dict(state, strict=False)


def load_at_size(model, state):
    """Load the state of the same model built at another input size (--input_size_schedule): every weight carries
    over; only the fixed position tables differ in shape, and the model keeps its own, computed for its grid."""
    own, weights = model.state_dict(), {n for n, _ in model.named_parameters()}
    resized = {k for k in state if k in own and state[k].shape != own[k].shape}
    if set(state) != set(own) or resized & weights:
        raise ValueError(f"{type(model).__name__}: the state is not this model's at another input size "
                         f"(keys {sorted(set(state) ^ set(own))[:4]}, resized weights {sorted(resized & weights)[:4]})")
    model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)


# run_pretrain.py flags that configure the model, with their defaults: run_pretrain.py's parser takes them
# from here, and a checkpoint written before a flag existed is rebuilt with its default. input_size None: the
# model's own (224 px for the ImageNet-sized models, 32 or 64 px for the small ones)
BUILD_DEFAULTS = dict(input_size=None, norm_pix_loss=False, hog_nbins=9, hog_bias=False, loss_weights='uniform',
                      all_stages=False, freezeout=False, freezeout_rules='original', freeze_decoders=False,
                      grad_ckpt=False, layer_scale=None, pos_embed='sincos', target='hog', shared_mask=False,
                      original_merged_coords=False)


def saved_args(ckpt):
    """A checkpoint's arguments as a Namespace, defaults filled in for flags newer than the checkpoint (saved as a
    dict here, as an argparse.Namespace by facebookresearch/mae and Haoqing-Wang/LocalMIM)."""
    args = argparse.Namespace(**{**BUILD_DEFAULTS, **saved_run_args(ckpt)})
    args.input_size = args.input_size or 224  # a checkpoint without arguments: the originals train at 224 px only
    return args


def refuse_flags(args, flags, applies_to):
    """One line for the first of `flags` that is set away from its default on a model it does not apply to."""
    for flag in flags:
        if getattr(args, flag) != BUILD_DEFAULTS[flag]:
            raise UsageError(f"--{flag} applies to {applies_to}, not to {args.model}")


def build(args):
    """The pre-training model named by args.model, configured from the run's arguments."""
    models = all_models()
    if args.model not in models:
        raise UsageError(f"unknown --model {args.model!r}; choose one of: {', '.join(models)}")
    if args.model.startswith('MIM_swin_'):
        refuse_flags(args, ['freezeout', 'freeze_decoders', 'all_stages', 'layer_scale', 'pos_embed'],
                     'the ViT models (Swin has no per-block FreezeOut units, no cls-token position table)')
        if args.norm_pix_loss and args.target != 'pixel':
            raise UsageError("--norm_pix_loss normalises pixel targets: pass --target pixel with it")
        kwargs = dict(grad_ckpt=args.grad_ckpt, target=args.target,
                      hog_nbins=args.hog_nbins, hog_bias=args.hog_bias, norm_pix_loss=args.norm_pix_loss,
                      loss_weights=args.loss_weights, shared_mask=args.shared_mask,
                      original_merged_coords=args.original_merged_coords)
    else:
        refuse_flags(args, ['target', 'shared_mask', 'original_merged_coords'], 'LocalMIM on Swin (MIM_swin_*)')
        original_rules = args.freezeout and args.freezeout_rules == 'original'
        kwargs = dict(cls_token_in_unit0=not original_rules, grad_ckpt=args.grad_ckpt,
                      layer_scale=args.layer_scale, pos_embed=args.pos_embed)
        if args.model.startswith('MIM_'):
            if args.norm_pix_loss:
                raise UsageError("--norm_pix_loss applies to the MAE baseline (mae_vit_*) and to LocalMIM on Swin "
                                 "with --target pixel, not to LocalMIM on ViT")
            # the original rules drop a tap's decoder when the unit it reads freezes
            kwargs.update(hog_nbins=args.hog_nbins, hog_bias=args.hog_bias,
                          freeze_decoders=args.freeze_decoders or original_rules,
                          all_stages=args.all_stages, loss_weights=args.loss_weights)
        else:
            refuse_flags(args, ['hog_bias', 'all_stages', 'loss_weights'], 'LocalMIM (MIM_*)')
            kwargs.update(norm_pix_loss=args.norm_pix_loss)
    if args.input_size is not None:  # otherwise the model's own size
        patch = int(re.search(r'patch(\d+)', args.model).group(1))
        if args.input_size % patch:
            raise UsageError(f"--input_size {args.input_size} is not a multiple of the patch size {patch} "
                             f"of {args.model}")
        kwargs.update(img_size=args.input_size)
    try:
        return models[args.model](**kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None
