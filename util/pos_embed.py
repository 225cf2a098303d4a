"""Position embeddings: the fixed 2-D sine-cosine table (MAE convention) and its resizing for fine-tuning,
or axial 2-D rotary embeddings (--pos_embed rope)."""
import torch
from timm.layers import create_rope_embed, resample_abs_pos_embed, resize_rel_pos_bias_table

# --pos_embed rope: axial 2-D RoPE as in timm's RoPE-ViT models (vit_*_patch16_rope_224, naver-ai/rope-vit's
# RoPE-Axial): a quarter of each head's channel pairs rotates with the column index, a quarter with the row
# index, at frequencies 1 / 100^(k / n). Integer token indices: any grid size works without interpolation.
ROPE_TEMPERATURE, ROPE_GRID_INDEXING = 100., 'xy'


def sincos_1d(dim, positions):
    """(N,) positions -> (N, dim): [sin | cos] at dim/2 geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(dim, grid_size, cls_token=False):
    """(grid_size**2 [+1], dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing='ij')
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float()


def interpolate_pos_embed(checkpoint_model, model):
    """Resize a checkpoint's (1, 1+L, D) position embedding to the model's token grid, in place."""
    if 'pos_embed' not in checkpoint_model:
        return
    pos_embed = checkpoint_model['pos_embed']
    new_grid = model.patch_embed.grid_size
    old_len = pos_embed.shape[1] - model.num_prefix_tokens
    old_side = int(old_len ** 0.5)
    if old_side * old_side != old_len:
        raise ValueError(f"checkpoint pos_embed has {old_len} patch positions, not a square grid")
    if (old_side, old_side) != tuple(new_grid):
        print(f"Interpolating position embedding from {old_side}x{old_side} to {new_grid[0]}x{new_grid[1]}")
        checkpoint_model['pos_embed'] = resample_abs_pos_embed(
            pos_embed, new_size=list(new_grid), old_size=[old_side, old_side],
            num_prefix_tokens=model.num_prefix_tokens)


def resize_relative_position_tables(state, model):
    """Swin: a checkpoint's relative position bias tables resized to the classifier's window, in place, with
    timm's interpolation (FastMIM pre-trains Swin-B with windows of 4 at 128 px and fine-tunes with 7 at 224)."""
    own = model.state_dict()
    resized = [k for k in state if k.endswith('relative_position_bias_table') and k in own
               and state[k].shape != own[k].shape]
    for k in resized:
        window = tuple(model.get_submodule(k.rsplit('.', 1)[0]).window_size)
        state[k] = resize_rel_pos_bias_table(state[k], new_window_size=window, new_bias_shape=own[k].shape)
    if resized:
        print(f'Resized {len(resized)} relative position bias tables to windows of {window[0]}')


def rope_table(dim, num_heads, grid_size):
    """(grid_size**2, 2 * dim / num_heads) [sin | cos] table of the patch tokens, in row-major token order, as
    timm's Eva computes it for the same settings (its rotary attention leaves the cls token unrotated)."""
    rope = create_rope_embed('cat', dim=dim, num_heads=num_heads, feat_shape=[grid_size, grid_size],
                             temperature=ROPE_TEMPERATURE, grid_indexing=ROPE_GRID_INDEXING, in_pixels=False)
    return rope.get_embed()
