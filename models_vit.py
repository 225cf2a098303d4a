"""ViT and Swin classifiers for fine-tuning and linear probing: timm's VisionTransformer and SwinTransformer
through their own constructors, so timm.create_model('vit_base_patch16_224', num_classes=K, global_pool='avg')
(or timm's SwinTransformer) loads our state dicts strictly (with rotary position embeddings timm's Eva, the
architecture of its RoPE-ViT models). Also the loading of our pre-training checkpoints into them."""
import contextlib
import io
from functools import partial

import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import models_mim
import models_swin
from util.errors import UsageError
from util.checkpoint import load_checkpoint_file
from util.pos_embed import (ROPE_GRID_INDEXING, ROPE_TEMPERATURE, interpolate_pos_embed,
                            resize_relative_position_tables)

# keys of the pre-training models that the classifier has no use for
PRETRAIN_ONLY = ('decoders.', 'tap_norms.', 'decoder_', 'mask_token', 'hog.')


def rope_vit_kwargs():
    """timm Eva arguments of a ViT with the rotary position embeddings of --pos_embed rope (models_mim)."""
    return dict(attn_type='rope', use_abs_pos_emb=False, use_rot_pos_emb=True, rope_temperature=ROPE_TEMPERATURE,
                rope_grid_indexing=ROPE_GRID_INDEXING)


def _vit(img_size, patch_size, embed_dim, depth, num_heads, num_classes=1000, global_pool=True,
         drop_path_rate=0., pos_embed='sincos', **kw):
    arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=4., qkv_bias=True, num_classes=num_classes, global_pool='avg' if global_pool else 'token',
                drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
    if pos_embed == 'rope':
        return Eva(**arch, **rope_vit_kwargs())
    return VisionTransformer(**arch)


def vit_tiny_patch4(img_size=32, **kw):
    return _vit(img_size, 4, 192, 6, 3, **kw)


def vit_tiny_patch8(img_size=64, **kw):
    return _vit(img_size, 8, 192, 6, 3, **kw)


def vit_small_patch16(img_size=224, **kw):
    return _vit(img_size, 16, 384, 12, 6, **kw)


def vit_base_patch16(img_size=224, **kw):
    return _vit(img_size, 16, 768, 12, 12, **kw)


def vit_large_patch16(img_size=224, **kw):
    return _vit(img_size, 16, 1024, 24, 16, **kw)


def vit_huge_patch14(img_size=224, **kw):
    return _vit(img_size, 14, 1280, 32, 16, **kw)


class SwinClassifier(SwinTransformer):
    """timm's SwinTransformer with Haoqing-Wang/LocalMIM's Swin fine-tuning rules. Layer decay: the patch
    embedding is layer 0, block j of stage i layer sum(depths[:i]) + j + 1, a stage's patch merging the layer of
    the previous stage's last block, the norm and head the top layer. Weight decay also on the relative position
    tables (its no_weight_decay names only absolute position embeddings, which these models do not have)."""

    def group_matcher(self, coarse=False):
        depths = [len(stage.blocks) for stage in self.layers]

        def layer_of(name):
            p = name.split('.')
            if p[0] == 'patch_embed':
                return 0
            if p[0] == 'layers':
                first = sum(depths[:int(p[1])])
                return first if p[2] == 'downsample' else first + int(p[3]) + 1
            return sum(depths) + 1
        return layer_of

    def no_weight_decay(self):
        return set()


def _swin(size, num_classes=1000, global_pool=True, drop_path_rate=0., **kw):
    """timm's SwinTransformer of the LocalMIM Swin encoder `size` (models_swin.ARCHS)."""
    if not global_pool:
        raise ValueError("a Swin encoder has no cls token: pass --global_pool (the mean of its last-stage tokens)")
    return SwinClassifier(**{**models_swin.ARCHS[size], **kw}, num_classes=num_classes, drop_path_rate=drop_path_rate,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6))


def swin_tiny_patch2_win4(**kw):
    return _swin('tiny_patch2_win4', **kw)


def swin_base_patch4_win7(**kw):
    return _swin('base_patch4_win7', **kw)


def swin_base_patch4_win4(**kw):
    return _swin('base_patch4_win4', **kw)


def swin_base_patch4_win14(**kw):
    return _swin('base_patch4_win14', **kw)


def swin_large_patch4_win14(**kw):
    return _swin('large_patch4_win14', **kw)


MODELS = {name: fn for name, fn in list(globals().items()) if name.startswith(('vit_', 'swin_'))}


def build(name, **kw):
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose one of: {', '.join(MODELS)}")
    try:
        return MODELS[name](**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def encoder_state_dict(checkpoint_model):
    """The encoder of a LocalMIM/MAE checkpoint, with timm's names. LocalMIM has no `norm`: the norm of
    its last tap, which always reads the final block, plays that role."""
    state = dict(checkpoint_model)
    state = models_mim.from_released_layout(state)[0]  # Haoqing-Wang/LocalMIM's released checkpoints
    if 'norm.weight' not in state and 'tap_norms.0.weight' in state:
        last = max(int(k.split('.')[1]) for k in state if k.startswith('tap_norms.'))
        state['norm.weight'], state['norm.bias'] = state[f'tap_norms.{last}.weight'], state[f'tap_norms.{last}.bias']
    return {k: v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY)}


def checkpoint_kwargs(path):
    """Classifier arguments that a checkpoint's encoder needs beyond the model name (`encoder_kwargs`); {}
    without a checkpoint."""
    if not path:
        return {}
    state = load_checkpoint_file(path)
    return encoder_kwargs(state.get('model', state))


def encoder_kwargs(state):
    """Classifier arguments for an encoder state dict (any prefix): `init_values` when its blocks have LayerScale
    (any value: the weights replace it), `pos_embed='rope'` when it has a cls token and no position table."""
    kwargs = {}
    if any(k.endswith(('.ls1.gamma', '.gamma_1')) for k in state):
        kwargs['init_values'] = 1e-5
    if any(k.endswith('cls_token') for k in state) and not any(k.endswith('pos_embed') for k in state):
        kwargs['pos_embed'] = 'rope'
    return kwargs


def load_pretrained(model, path):
    """Load the encoder of a pre-training checkpoint into a classifier: drop decoder/HOG keys, resize the
    position embedding (Swin: its relative position tables), keep the classifier's own head; anything else that does
    not fit is an error."""
    ckpt = load_checkpoint_file(path)
    state = encoder_state_dict(ckpt.get('model', ckpt))
    own = model.state_dict()
    for k in [k for k in state if k.startswith(('head.', 'fc_norm.', 'norm.')) and k not in own]:
        del state[k]  # e.g. the final norm, which a global-pool classifier replaces by fc_norm
    for k in [k for k in state if k.startswith('head.') and k in own and state[k].shape != own[k].shape]:
        del state[k]
    interpolate_pos_embed(state, model)
    resize_relative_position_tables(state, model)
    source = getattr(models_mim.saved_args(ckpt), 'model', 'unknown model')
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    allowed_missing = {k for k in own if k.startswith(('head.', 'fc_norm.'))}
    if mismatched or unexpected or set(missing) - allowed_missing:
        raise UsageError(
            f"{path} ({source}) does not fit this classifier: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]}, shape mismatches {mismatched[:4]}; pick the --model of the same size")
    model.load_state_dict(state, strict=False)
    print(f'Loaded {path} ({source}); newly initialised: {missing}')
    return missing


def init_head(model):
    """MAE: a tiny-std head, so fine-tuning starts from the pre-trained features, not from noise."""
    head = model.get_classifier()
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)


class LinearProbe(nn.Module):
    """Frozen encoder (eval mode, no autograd) + BatchNorm without affine + linear head (MAE)."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            feats = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return self.head(feats)


def load_encoder(path, model=None, img_size=None):
    """The encoder of any checkpoint (this project's pre-training or fine-tuning, Haoqing-Wang/LocalMIM's,
    facebookresearch/mae's) as a timm VisionTransformer (Eva with rotary position embeddings) without head, in
    eval mode. `model` (e.g. 'vit_base_patch16') defaults to the checkpoint's own; `img_size` to its input size,
    and another size interpolates a position table (rotary embeddings need nothing). Use it with `embed`:

    >>> import os, tempfile, torch, models_mim
    >>> path = os.path.join(tempfile.mkdtemp(), 'checkpoint.pth')
    >>> torch.save({'model': models_mim.MIM_vit_tiny_patch4().state_dict(),
    ...             'args': {'model': 'MIM_vit_tiny_patch4', 'input_size': 32}}, path)
    >>> encoder = load_encoder(path)
    >>> embed(encoder, torch.rand(2, 3, 32, 32)).shape            # cls token
    torch.Size([2, 192])
    >>> embed(encoder, torch.rand(2, 3, 32, 32), pool='tokens').shape
    torch.Size([2, 64, 192])
    >>> embed(load_encoder(path, img_size=64), torch.rand(1, 3, 64, 64), pool='mean').shape
    torch.Size([1, 192])
    """
    saved = models_mim.saved_args(load_checkpoint_file(path))
    name = model or getattr(saved, 'model', None)
    if name is None:
        raise UsageError(f"{path} does not name its model; pass model='vit_base_patch16' (or its size)")
    name = name.removeprefix('MIM_').removeprefix('mae_')
    encoder = build(name, img_size=img_size or saved.input_size, num_classes=0,  # Swin always pools
                    global_pool=bool(getattr(saved, 'global_pool', name.startswith('swin_'))), **checkpoint_kwargs(path))
    with contextlib.redirect_stdout(io.StringIO()):  # an API call: the training scripts' progress lines stay out
        load_pretrained(encoder, path)
    return encoder.eval()


@torch.no_grad()
def embed(encoder, images, pool='cls'):
    """Features of a batch: `images` a (B, 3, H, W) tensor of RGB values in [0, 1] (or uint8) at the encoder's
    input size, or a list of PIL images (resized and centre-cropped as in evaluation). `pool`: 'cls' (the cls
    token after the final norm), 'mean' (mean of the patch tokens) or 'tokens' (B, L, D)."""
    from util.datasets import eval_transform
    from util.pipeline import to_device
    device = next(encoder.parameters()).device
    if isinstance(images, (list, tuple)):
        images = torch.stack([eval_transform(encoder.patch_embed.img_size[0])(img) for img in images]).to(device)
    else:
        images = to_device(images if images.dtype == torch.uint8 else (images * 255).round().to(torch.uint8), device)
    tokens = encoder.forward_features(images)  # (B, 1+L, D); Swin (B, h, w, D) without cls token
    if tokens.ndim == 4:
        tokens = tokens.flatten(1, 2)
        if pool == 'cls':
            raise ValueError("a Swin encoder has no cls token: use pool='mean' or 'tokens'")
    if pool == 'cls':
        return tokens[:, 0]
    if pool == 'mean':
        return tokens[:, getattr(encoder, 'num_prefix_tokens', 0):].mean(1)
    if pool == 'tokens':
        return tokens[:, getattr(encoder, 'num_prefix_tokens', 0):]
    raise ValueError(f"pool must be 'cls', 'mean' or 'tokens', got {pool!r}")

