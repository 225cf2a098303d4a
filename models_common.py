"""What both pre-training model families share (the ViT family in models_mim, the Swin family in models_swin):
the norm layer, facebookresearch/mae's initialisation, pixel targets by patch, the masked mean squared error and
LocalMIM's weighted sum of its decoders' losses."""
import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def kept_units(units, mask_ratio):
    """Units (ViT patches, Swin mask units) a mask keeps visible: int(units x (1 - mask_ratio)), as MAE."""
    return int(units * (1 - mask_ratio))


def gather_kept(x, ids_keep):
    """The kept rows of x (B, N, ...) for each masked sample: ids_keep (B', n) -> (B', n, ...). B' = B, one mask per
    crop; or B x K, the K masks of each crop next to each other (--masks_per_image), each indexed from its crop's one
    row, so that the crop's embedding is neither computed nor copied per mask."""
    if ids_keep.shape[0] == x.shape[0]:
        return x.gather(1, ids_keep.view(*ids_keep.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    crop = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids_keep.shape[0] // x.shape[0])
    return x[crop[:, None], ids_keep]


def per_mask(pred, target, weight, masks):
    """(prediction, target, weight) of a crop masked `masks` times: the predictions and weights of its masks
    (B x K, ...) grouped as (B, K, ...), the crop's one target (B, ...) broadcast to its K masks as (B, 1, ...),
    so that the target is neither computed nor copied per mask."""
    if masks == 1:
        return pred, target, weight
    return pred.unflatten(0, (-1, masks)), target.unsqueeze(1), weight.unflatten(0, (-1, masks))


def localmim_loss(model, imgs, mask_ratio, noise):
    """LocalMIM's loss (ViT or Swin): the weighted sum of the active taps' masked MSEs, and {name: unweighted
    detached loss} per tap for the log."""
    out, _ = model.forward_predictions(imgs, mask_ratio, noise)
    names = model.loss_names()
    losses = {k: masked_mse(*v) for k, v in out.items()}
    # a weight of 1 leaves the loss itself, not `0 + 1.0 * loss`: compiled as one graph (inductor) with one tap
    # left, that sum and the loss's detached copy come back as one tensor, and the loss loses its gradient
    weighted = [loss if model.loss_weights[k] == 1 else model.loss_weights[k] * loss for k, loss in losses.items()]
    total = sum(weighted[1:], weighted[0])
    return total, {names[k]: loss.detach() for k, loss in losses.items()}


def tap_loss_weights(spec, num_taps):
    """'uniform' (the paper), 'inverse_depth' (1/k for the k-th tap) or a list of one weight per tap."""
    if spec in (None, 'uniform'):
        return [1.] * num_taps
    if spec == 'inverse_depth':
        return [1. / k for k in range(1, num_taps + 1)]
    weights = [float(w) for w in (spec.split(',') if isinstance(spec, str) else spec)]
    if len(weights) != num_taps:
        raise ValueError(f"--loss_weights gives {len(weights)} weights for {num_taps} decoders")
    return weights


def init_weights(model):
    """facebookresearch/mae's initialisation: Xavier-uniform linear layers (the patch embedding as one), unit
    LayerNorms, tokens N(0, 0.02); other layers (timm's relative position tables) keep their own."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for name, p in model.named_parameters():
        if name.endswith('token'):
            nn.init.normal_(p, std=.02)


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, L, p*p*3): square p x p cells, row-major, each as (p, p, 3) row-major."""
    B, _, H, W = imgs.shape
    x = imgs.reshape(B, 3, H // p, p, W // p, p)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(B, (H // p) * (W // p), p * p * 3)


def unpatchify(x, p):
    """The inverse of patchify for a square image."""
    g = math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], g, g, p, p, 3)
    return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], 3, g * p, g * p)


def masked_mse(pred, target, weight):
    """Mean squared error per cell over the feature width, averaged with `weight` (B, N) over cells (per_mask's
    (B, K, N) with the target broadcast over K likewise)."""
    per_cell = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_cell * weight).sum() / weight.sum()
