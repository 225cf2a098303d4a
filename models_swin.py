"""LocalMIM on Swin Transformers (the Swin half of Haoqing-Wang/LocalMIM).

The mask lives on the grid of the last stage (7x7 at 224 px: a masked unit is 32x32 pixels), so every stage
sees whole units and patch merging never mixes visible and masked tokens. Only the visible tokens enter the
encoder; each attends to the visible tokens of its own (shifted) window, with the window's relative position
bias. One light ViT decoder per stage reads the stage's output after patch merging (the last stage's as is)
and predicts HOG features (or pixels) of its cells: 8, 16, 32, 32 px for Swin-B at 224.
Encoder parameter names equal timm's SwinTransformer, so fine-tuning and timm load the encoder directly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block

from models_common import (LayerNorm, gather_kept, init_weights, kept_units, localmim_loss, patchify, per_mask,
                           tap_loss_weights)
from util.hog import HOGTarget
from util.pos_embed import get_2d_sincos_pos_embed

TARGETS = ('hog', 'pixel')


def unit_token_coords(ids_keep, mask_grid, unit):
    """(row, col) of every visible token on its stage's grid, (B, K*unit*unit, 2), in the order of the
    token tensor: kept units in the order of ids_keep (B, K), each unit's tokens row-major."""
    uy, ux = ids_keep // mask_grid, ids_keep % mask_grid  # (B, K)
    t = torch.arange(unit, device=ids_keep.device)
    ty, tx = t.view(unit, 1).expand(unit, unit), t.view(1, unit).expand(unit, unit)
    rows = uy[:, :, None, None] * unit + ty
    cols = ux[:, :, None, None] * unit + tx
    return torch.stack([rows, cols], dim=-1).flatten(1, 3)


def original_merged_coords(ids_keep, mask_grid, unit):
    """The coordinates Haoqing-Wang/LocalMIM gives the visible tokens after a patch merging: the raster
    coordinates of the grid taken at the tokens' unit-major indices (its PatchMerging indexes raster coordinates
    with a unit-major mask), right only where a unit is one token. Its windows and relative positions at the
    middle stages follow them; --original_merged_coords reproduces that."""
    flat = (ids_keep[:, :, None] * unit * unit + torch.arange(unit * unit, device=ids_keep.device)).flatten(1)
    grid = mask_grid * unit
    return torch.stack([flat // grid, flat % grid], dim=-1)


def visible_attention_layout(coords, window, shift):
    """Attention of every visible token to every other, restricted to its (shifted) window: the pairs allowed
    and each pair's index into the (2w-1)^2 relative position table. Shifted windows are timm's rolled windows
    with their wrap-around mask, written as groups in image coordinates (GreenMIM): the window boundaries sit at
    shift, shift + window, ... Cheapest when few tokens are visible. coords (B, N, 2) -> two (B, N, N)."""
    group = torch.div(coords + (window - shift) % window, window, rounding_mode='floor')
    allowed = (group[:, :, None] == group[:, None, :]).all(-1)
    d = coords[:, :, None] - coords[:, None, :] + window - 1  # (B, N, N, 2), query minus key, as timm
    index = d[..., 0] * (2 * window - 1) + d[..., 1]
    return allowed, index.masked_fill(~allowed, 0)


def window_slot_layout(coords, grid, window, shift):
    """The visible tokens placed in timm's (rolled) windows, empty slots padded: each token's slot
    (window * w^2 + position in the window) and its region (tokens of one rolled window attend to each other
    only within a region, timm's wrap-around mask). Costs what dense windows cost: cheapest when many tokens
    are visible. coords (B, N, 2) -> two (B, N)."""
    rolled = (coords - shift) % grid  # timm rolls the grid by -shift
    win, pos = rolled // window, rolled % window
    slot = (win[..., 0] * (grid // window) + win[..., 1]) * window * window + pos[..., 0] * window + pos[..., 1]
    group = torch.div(coords + (window - shift) % window, window, rounding_mode='floor')
    return slot, group[..., 0] * (grid + 1) + group[..., 1]


def attend_visible(attn, qkv, allowed, index):
    """qkv (3, B, heads, N, d) of the visible tokens -> (B, heads, N, d), the pairs of `visible_attention_layout`."""
    bias = attn.relative_position_bias_table[index].permute(0, 3, 1, 2)  # (B, heads, N, N)
    bias = bias.masked_fill(~allowed[:, None], float('-inf')).to(qkv.dtype)
    return F.scaled_dot_product_attention(*qkv.unbind(0), attn_mask=bias)


def attend_windows(attn, qkv, slot, region, num_slots):
    """qkv (3, B, heads, N, d) -> (B, heads, N, d) through the padded windows of `window_slot_layout`. An empty
    slot is a region of its own (-1), so that no row of the softmax is empty."""
    _, B, H, N, d = qkv.shape
    area = attn.window_area
    packed = qkv.new_zeros(3, B, H, num_slots, d).scatter(3, slot[None, :, None, :, None].expand_as(qkv), qkv)
    packed = packed.view(3, B, H, num_slots // area, area, d).transpose(2, 3).flatten(1, 2)  # (3, B*nW, H, a, d)
    regions = region.new_full((B, num_slots), -1).scatter(1, slot, region).view(-1, area)
    allowed = regions[:, :, None] == regions[:, None, :]  # (B*nW, a, a)
    bias = attn._get_rel_pos_bias().masked_fill(~allowed[:, None], float('-inf')).to(qkv.dtype)
    h = F.scaled_dot_product_attention(*packed.unbind(0), attn_mask=bias)  # (B*nW, H, a, d)
    h = h.view(B, num_slots // area, H, area, d).transpose(1, 2).flatten(2, 3)  # (B, H, slots, d)
    return h.gather(2, slot[:, None, :, None].expand(-1, H, -1, d))


def attention_layout(coords, grid, window, shift):
    """The cheaper of the two exact ways for a window block to attend among N visible tokens: all pairs masked
    to the windows (N^2 scores) or the padded windows (grid^2 * w^2 scores, what dense windows cost). N is
    fixed by the mask ratio, so the choice is fixed for a run (no recompilation)."""
    n = coords.shape[1]
    if n * n <= grid * grid * window * window:
        return attend_visible, visible_attention_layout(coords, window, shift)
    return attend_windows, (*window_slot_layout(coords, grid, window, shift), grid * grid)


def sparse_swin_block(blk, x, attend, *layout):
    """timm SwinTransformerBlock on the visible tokens x (B, N, C) of a batch: its own weights, attention within
    the windows that `layout` describes, with the block's relative position bias."""
    B, N, C = x.shape
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    h = attend(attn, qkv, *layout)
    x = x + blk.drop_path1(attn.proj(h.transpose(1, 2).reshape(B, N, C)))
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


class MaskedSwin(nn.Module):
    """Swin encoder (timm's patch embedding and stages) that runs on the visible mask units only."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=7, grad_ckpt=False, shared_mask=False,
                 original_merged_coords=False):
        super().__init__()
        swin = SwinTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                               embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                               drop_path_rate=0., norm_layer=LayerNorm)
        self.patch_embed, self.layers = swin.patch_embed, swin.layers  # timm's names: the encoder loads into timm
        self.depths, self.stage_dims = tuple(depths), [s.blocks[0].dim for s in self.layers]
        grid, stages = self.patch_embed.grid_size[0], len(depths)
        # a mask unit is one token of the last stage: 2^(stages-1) tokens square at the first
        self.unit = 2 ** (stages - 1)
        if grid % self.unit:
            raise ValueError(f"the {grid}x{grid} token grid does not halve {stages - 1} times: pick --input_size as "
                             f"a multiple of {patch_size * self.unit}")
        self.mask_grid = grid // self.unit
        for s, stage in enumerate(self.layers):
            res, win = stage.blocks[0].input_resolution[0], stage.blocks[0].window_size[0]
            if res % win:
                raise ValueError(f"stage {s} has a {res}x{res} grid that {win}x{win} windows do not tile: "
                                 f"pick --input_size so that every stage's grid is a multiple of the window")
        self.grad_ckpt = grad_ckpt
        # Haoqing-Wang/LocalMIM draws one mask per step for the whole batch (--shared_mask reproduces it)
        self.shared_mask = shared_mask
        self.original_merged_coords = original_merged_coords
        self.frozen_units = 0  # no FreezeOut for Swin: the step record reads it

    @property
    def num_mask_units(self):
        return self.mask_grid ** 2

    def stage_grids(self):
        """Token grid side of each stage."""
        return [stage.blocks[0].input_resolution[0] for stage in self.layers]

    def random_units(self, batch, mask_ratio, noise, device):
        """Kept mask units (B, K) in raster order, K = int(units * (1 - mask_ratio)) as MAE, and the unit
        mask (B, units), 1 = masked. `noise` (B, units) from the pipeline; drawn here when None; (B, masks, units)
        with --masks_per_image: then per masked sample, (B x masks, ...)."""
        units = self.num_mask_units
        if noise is None:
            noise = torch.rand(batch, units, device=device)
        noise = noise.flatten(0, -2)
        if self.shared_mask:
            noise = noise[:1].expand(noise.shape[0], -1)
        ids_keep = noise.argsort(dim=1)[:, :kept_units(units, mask_ratio)].sort(dim=1).values
        mask = torch.ones(noise.shape[0], units, device=device).scatter_(1, ids_keep, 0.)
        return ids_keep, mask

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """Visible tokens after each stage's patch merging (the last stage's output for the last) as
        (B, K*u*u, C) with u the unit's side on that grid; kept units (B, K) and the unit mask (B, units)."""
        x = self.patch_embed(imgs)  # (B, G, G, C), once per crop whatever its number of masks
        B, _, _, C = x.shape
        M, u = self.mask_grid, self.unit
        ids_keep, mask = self.random_units(B, mask_ratio, noise, x.device)
        K = ids_keep.shape[1]
        x = x.view(B, M, u, M, u, C).permute(0, 1, 3, 2, 4, 5).reshape(B, M * M, u, u, C)
        x, B = gather_kept(x, ids_keep), ids_keep.shape[0]  # (B x masks, K, u, u, C)
        feats = []
        for s, stage in enumerate(self.layers):
            if s > 0:  # timm's patch merging of 2x2 tokens, inside each unit
                x = stage.downsample(x.flatten(0, 1)).unflatten(0, (B, K))
                u //= 2
                feats.append(x.flatten(1, 3))
            if s > 0 and self.original_merged_coords:
                coords = original_merged_coords(ids_keep, M, u)
            else:
                coords = unit_token_coords(ids_keep, M, u)
            layouts = {}
            tokens = x.flatten(1, 3)
            grid = stage.blocks[0].input_resolution[0]
            for blk in stage.blocks:
                key = (blk.window_size[0], blk.shift_size[0])
                if key not in layouts:
                    attend, layout = attention_layout(coords, grid, *key)
                    layouts[key] = (attend, *layout)
                if self.grad_ckpt and torch.is_grad_enabled():
                    tokens = torch.utils.checkpoint.checkpoint(sparse_swin_block, blk, tokens, *layouts[key],
                                                               use_reentrant=False)
                else:
                    tokens = sparse_swin_block(blk, tokens, *layouts[key])
            x = tokens.view(B, K, u, u, -1)
        feats.append(x.flatten(1, 3))
        return feats, ids_keep, mask


class GridDecoder(nn.Module):
    """Haoqing-Wang/LocalMIM's Swin decoder: the visible tokens and mask tokens on the full grid of a tap,
    a fixed sin-cos table, one ViT block, a norm and a per-cell linear prediction."""

    def __init__(self, in_dim, dim, num_heads, grid_size, out_dim):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer('pos_embed', get_2d_sincos_pos_embed(dim, grid_size).unsqueeze(0))
        self.block = Block(dim, num_heads, 4., qkv_bias=True, norm_layer=LayerNorm)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, x, positions):
        """x (B, n, in_dim) visible tokens at raster `positions` (B, n) -> (B, grid*grid, out_dim)."""
        x = self.embed(x)
        B, _, D = x.shape
        grid = self.mask_token.expand(B, self.pos_embed.shape[1], D)
        x = grid.scatter(1, positions.unsqueeze(-1).expand(-1, -1, D), x.to(grid.dtype))
        return self.pred(self.norm(self.block(x + self.pos_embed)))


class LocalMIMSwin(MaskedSwin):
    def __init__(self, decoder_dim=128, decoder_heads=4, target='hog', hog_nbins=9, hog_bias=False,
                 norm_pix_loss=False, loss_weights='uniform', **kwargs):
        super().__init__(**kwargs)
        if target not in TARGETS:
            raise ValueError(f"--target must be one of {TARGETS}, got {target!r}")
        stages, patch = len(self.depths), self.patch_embed.patch_size[0]
        grids = self.stage_grids()
        # tap k reads stage k after the next stage's patch merging; the last tap the last stage
        self.tap_grids = grids[1:] + grids[-1:]
        self.tap_dims = self.stage_dims[1:] + self.stage_dims[-1:]
        self.cell_sizes = [patch * grids[0] // g for g in self.tap_grids]
        self.target, self.norm_pix_loss = target, norm_pix_loss
        self.loss_weights = tap_loss_weights(loss_weights, stages)
        out_dims = [3 * hog_nbins if target == 'hog' else 3 * c * c for c in self.cell_sizes]
        self.tap_norms = nn.ModuleList([LayerNorm(d) for d in self.tap_dims])
        # the finest tap's decoder is half as wide (Haoqing-Wang/LocalMIM)
        self.decoders = nn.ModuleList([
            GridDecoder(d, decoder_dim // 2 if k == 0 else decoder_dim, decoder_heads, g, o)
            for k, (d, g, o) in enumerate(zip(self.tap_dims, self.tap_grids, out_dims))])
        self.hog = HOGTarget(hog_nbins, self.cell_sizes, hog_bias) if target == 'hog' else None
        init_weights(self)

    def loss_names(self):
        return [f'loss_stage{k}_{c}px' for k, c in enumerate(self.cell_sizes)]

    def targets(self, imgs):
        """One (B, cells, width) target per tap, cells row-major: HOG, or pixels as (c, c, 3) per cell."""
        if self.hog is not None:
            return self.hog(imgs)
        out = []
        for c in self.cell_sizes:
            x = patchify(imgs.float(), c)
            if self.norm_pix_loss:
                x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + 1.e-6) ** .5
            out.append(x)
        return out

    def forward_predictions(self, imgs, mask_ratio, noise=None):
        """{tap: (prediction, target, cell weights)} and the unit mask (B, units)."""
        targets = self.targets(imgs)  # once per crop, whatever its number of masks
        feats, ids_keep, mask = self.forward_encoder(imgs, mask_ratio, noise)
        B, M = mask.shape[0], self.mask_grid
        out = {}
        for k, (feat, g) in enumerate(zip(feats, self.tap_grids)):
            coords = unit_token_coords(ids_keep, M, g // M)
            pred = self.decoders[k](self.tap_norms[k](feat), coords[..., 0] * g + coords[..., 1])
            weight = mask.view(B, M, 1, M, 1).expand(-1, -1, g // M, -1, g // M).reshape(B, g * g)
            out[k] = per_mask(pred, targets[k], weight, B // imgs.shape[0])
        return out, mask

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return localmim_loss(self, imgs, mask_ratio, noise)


def is_localmim_swin_layout(state):
    """Haoqing-Wang/LocalMIM's MaskedAutoencoderSwin: the encoder under `encoder.` with per-stage norms
    `encoder.norm.<k>`, per-tap `decoder.<k>` (a linear probe of a Swin has `encoder.layers.` too, but neither)."""
    return (any(k.startswith('encoder.layers.') for k in state)
            and any(k.startswith(('encoder.norm.0.', 'decoder.')) for k in state))


def merge_order_from_original(w, dim):
    """Haoqing-Wang/LocalMIM (GreenMIM) concatenates a 2x2 block's tokens as (0,0), (0,1), (1,0), (1,1) (row,
    col); timm as (0,0), (1,0), (0,1), (1,1). Swap the middle two C-wide chunks of the last dimension."""
    a, b, c, d = w.split(dim, dim=-1)
    return torch.cat([a, c, b, d], dim=-1)


def from_localmim_swin_layout(state):
    """(state dict in this project's names, HOG gradient biases (taps, 2) or None) from Haoqing-Wang/LocalMIM's
    MaskedAutoencoderSwin. Its patch merging closes stage i (`encoder.layers.i.downsample`), timm's opens stage
    i+1; its per-stage norms `encoder.norm.<k>` are our tap norms; its decoders keep their block in `blocks.0`."""
    out, hog_bias = {}, {}
    for k, v in state.items():
        p = k.split('.')
        if p[0] == 'encoder':
            p = p[1:]
            if p[-1] == 'relative_position_index':  # a fixed table, rebuilt by timm
                continue
            if p[0] == 'norm':
                out['.'.join(['tap_norms', *p[1:]])] = v
            elif p[0] == 'layers' and p[2] == 'downsample':
                dim = v.shape[-1] // 4
                out['.'.join(['layers', str(int(p[1]) + 1), *p[2:]])] = merge_order_from_original(v, dim)
            else:
                out['.'.join(p)] = v
        elif p[0] == 'decoder':
            rest = ['block', *p[4:]] if p[2] == 'blocks' else p[2:]
            out['.'.join(['decoders', p[1], *rest])] = v
        elif p[0] == 'hog_enc':
            if p[-1] == 'bias':
                hog_bias[int(p[1])] = v
        else:
            out[k] = v
    biases = torch.stack([hog_bias[k] for k in sorted(hog_bias)]) if hog_bias else None
    return out, biases


# Model zoo: Swin-B/L as Haoqing-Wang/LocalMIM (norms eps 1e-6, decoders 128 wide with 4 heads); a tiny one for CPU
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
# the encoders by size, shared with their classifiers (models_vit.swin_*); tiny at 32 px: grids 16, 8, 4
# (4x4 mask units of 8 px), HOG cells 4, 8, 8 px
ARCHS = {
    'tiny_patch2_win4': dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12),
                             window_size=4),
    'base_patch4_win7': dict(img_size=224, patch_size=4, window_size=7, **_BASE),
    # FastMIM's low-resolution Swin-B: at 128 px the grids are 32, 16, 8, 4, which windows of 7 do not tile
    'base_patch4_win4': dict(img_size=128, patch_size=4, window_size=4, **_BASE),
    'base_patch4_win14': dict(img_size=224, patch_size=4, window_size=14, **_BASE),
    'large_patch4_win14': dict(img_size=224, patch_size=4, window_size=14, embed_dim=192, depths=(2, 2, 18, 2),
                               num_heads=(6, 12, 24, 48)),
}


def MIM_swin_tiny_patch2_win4(**kw):
    return LocalMIMSwin(**{**ARCHS['tiny_patch2_win4'], 'decoder_dim': 64, **kw})


def MIM_swin_base_patch4_win7(**kw):
    return LocalMIMSwin(**{**ARCHS['base_patch4_win7'], **kw})


def MIM_swin_base_patch4_win4(**kw):
    return LocalMIMSwin(**{**ARCHS['base_patch4_win4'], **kw})


def MIM_swin_base_patch4_win14(**kw):
    return LocalMIMSwin(**{**ARCHS['base_patch4_win14'], **kw})


def MIM_swin_large_patch4_win14(**kw):
    return LocalMIMSwin(**{**ARCHS['large_patch4_win14'], **kw})


MODELS = {name: fn for name, fn in list(globals().items()) if name.startswith('MIM_swin_')}
