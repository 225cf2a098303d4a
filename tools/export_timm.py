"""Write the encoder (or fine-tuned classifier) of one of our checkpoints as a plain timm state dict.

  python -m tools.export_timm output_dir/checkpoint-last.pth encoder.safetensors
Prints the line that loads it into timm.create_model(...).
"""
import argparse
from pathlib import Path

import torch

import models_mim
import models_swin
import models_vit
from util.checkpoint import load_checkpoint_file


def get_args_parser():
    p = argparse.ArgumentParser('export a checkpoint for timm')
    p.add_argument('checkpoint', help='pre-training, fine-tuning or linear-probe checkpoint of this codebase')
    p.add_argument('output', help='.pth or .safetensors')
    return p


def classifier_name(model_name):
    """MIM_vit_base_patch16 / mae_vit_base_patch16 / vit_base_patch16 -> vit_base_patch16 (MIM_swin_* likewise)."""
    name = model_name.removeprefix('MIM_').removeprefix('mae_')
    if name not in models_vit.MODELS:
        raise SystemExit(f"error: no classifier architecture for {model_name!r}")
    return name


def export(checkpoint, output):
    ckpt = load_checkpoint_file(checkpoint)
    saved_args = vars(models_mim.saved_args(ckpt))
    state = ckpt.get('model', ckpt)
    if not models_swin.is_localmim_swin_layout(state) and any(k.startswith('encoder.') for k in state):
        # linear probe: keep the frozen encoder
        state = {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}
    state = {k: v.contiguous() for k, v in models_vit.encoder_state_dict(state).items()}
    name = classifier_name(saved_args.get('model', ''))
    swin = name.startswith('swin_')
    head = 'head.fc.weight' if swin else 'head.weight'
    pool = 'avg' if swin or 'fc_norm.weight' in state else 'token'
    num_classes = state[head].shape[0] if head in state else 0
    encoder = models_vit.encoder_kwargs(state)
    with torch.device('meta'):  # the architecture only, no memory
        ref = models_vit.build(name, img_size=saved_args.get('input_size', 224), num_classes=num_classes,
                               global_pool=pool == 'avg', **encoder)
    missing, unexpected = set(ref.state_dict()) - set(state), set(state) - set(ref.state_dict())
    if missing or unexpected:
        raise SystemExit(f"error: {checkpoint} does not match {name}: missing {sorted(missing)[:6]}, "
                         f"unexpected {sorted(unexpected)[:6]}")
    output = Path(output)
    if output.suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(state, str(output))
        loader = f"safetensors.torch.load_file('{output}')"
    else:
        torch.save(state, output)
        loader = f"torch.load('{output}')"
    p, g = ref.patch_embed.patch_size[0], ref.patch_embed.img_size[0]
    print(f'wrote {output}: {name}, {len(state)} tensors. Load it with:')
    if swin:
        stages = [stage.blocks for stage in ref.layers]
        print(f"timm.models.swin_transformer.SwinTransformer(img_size={g}, patch_size={p}, embed_dim={ref.embed_dim}, "
              f"depths={tuple(len(b) for b in stages)}, num_heads={tuple(b[0].attn.num_heads for b in stages)}, "
              f"window_size={stages[0][0].attn.window_size[0]}, num_classes={num_classes}, "
              f"norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).load_state_dict({loader})")
        return state
    arch = (f"img_size={g}, patch_size={p}, embed_dim={ref.embed_dim}, depth={len(ref.blocks)}, "
            f"num_heads={ref.blocks[0].attn.num_heads}, num_classes={num_classes}, global_pool='{pool}'"
            f"{', init_values=1e-5' if 'init_values' in encoder else ''}")
    if 'pos_embed' in encoder:  # rotary: timm's Eva, the class of its RoPE-ViT models, built directly
        rope = ', '.join(f'{k}={v!r}' for k, v in models_vit.rope_vit_kwargs().items())
        print(f"timm.models.eva.Eva({arch}, qkv_bias=True, {rope}).load_state_dict({loader})")
    else:
        print(f"timm.create_model('vit_base_patch16_224', {arch}).load_state_dict({loader})")
    return state


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    export(args.checkpoint, args.output)
