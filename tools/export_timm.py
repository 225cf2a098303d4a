"""Write the encoder (or fine-tuned classifier) of one of our checkpoints for timm.

  python -m tools.export_timm output_dir/checkpoint-last.pth vit_b/        # a folder timm loads in one line:
  timm.create_model('local-dir:vit_b', pretrained=True)                    # config.json, model.safetensors, README.md
  python -m tools.export_timm output_dir/checkpoint-last.pth encoder.safetensors   # the state dict alone
The folder, pushed to the Hugging Face Hub, loads as timm.create_model('hf-hub:ORG/NAME', pretrained=True).
"""
import argparse
import json
from pathlib import Path

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models_mim
import models_swin
import models_vit
import util.misc as misc
from util import recipe
from util.checkpoint import load_checkpoint_file
from util.datasets import eval_crop_pct
from util.errors import UsageError


def get_args_parser():
    p = argparse.ArgumentParser('export a checkpoint for timm')
    p.add_argument('checkpoint', help='pre-training, fine-tuning or linear-probe checkpoint of this codebase')
    p.add_argument('output', help='a folder for timm (config.json, model.safetensors, README.md), or a .pth or '
                                  '.safetensors file of the state dict alone')
    return p


def classifier_name(model_name):
    """MIM_vit_base_patch16 / mae_vit_base_patch16 / vit_base_patch16 -> vit_base_patch16 (MIM_swin_* likewise)."""
    name = model_name.removeprefix('MIM_').removeprefix('mae_')
    if name not in models_vit.MODELS:
        raise UsageError(f"no classifier architecture for {model_name!r}")
    return name


def timm_architecture(name, state, input_size):
    """(registered timm architecture, its model_args) that build the classifier `name` for `state` with timm alone:
    the export's config.json, read by timm.create_model('local-dir:...')."""
    encoder = models_vit.encoder_kwargs(state)
    swin = name.startswith('swin_')
    head = 'head.fc.weight' if swin else 'head.weight'
    num_classes = state[head].shape[0] if head in state else 0
    with torch.device('meta'):  # the architecture only, no memory
        ref = models_vit.build(name, img_size=input_size, num_classes=num_classes,
                               global_pool=swin or 'fc_norm.weight' in state, **encoder)
    missing, unexpected = set(ref.state_dict()) - set(state), set(state) - set(ref.state_dict())
    if missing or unexpected:
        raise UsageError(f"the weights do not match {name}: missing {sorted(missing)[:6]}, unexpected "
                         f"{sorted(unexpected)[:6]}")
    size, patch = ref.patch_embed.img_size[0], ref.patch_embed.patch_size[0]
    if swin:
        stages = [stage.blocks for stage in ref.layers]
        return 'swin_base_patch4_window7_224', dict(
            img_size=size, patch_size=patch, embed_dim=ref.embed_dim, depths=[len(b) for b in stages],
            num_heads=[b[0].attn.num_heads for b in stages], window_size=stages[0][0].attn.window_size[0],
            num_classes=num_classes)
    args = dict(img_size=size, patch_size=patch, embed_dim=ref.embed_dim, depth=len(ref.blocks),
                num_heads=ref.blocks[0].attn.num_heads, mlp_ratio=4.0, num_classes=num_classes,
                global_pool='avg' if 'fc_norm.weight' in state else 'token')
    if 'init_values' in encoder:
        args['init_values'] = 1e-5  # LayerScale: any value, the weights replace it
    if 'pos_embed' in encoder:  # rotary: timm's Eva, built from the one registered Eva that sets no LayerScale
        return 'eva_giant_patch14_224', {**args, 'qkv_bias': True, **models_vit.rope_vit_kwargs()}
    return 'vit_base_patch16_224', args


def load_line(arch, source):
    """The timm line that loads an export with outputs equal to ours. Swin's norms have eps 1e-6 (timm's Swin 1e-5,
    which a config.json cannot change: a norm_layer given by name is not resolved), so its line passes the norm."""
    norm = ', norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)' if arch.startswith('swin_') else ''
    return f"timm.create_model('{source}', pretrained=True{norm})"


def model_card(arch, model_args, saved_args, checkpoint_name):
    """README.md of an export: what it is, what trained it (the recipe arguments of its checkpoint: no path, no
    token), how to load it."""
    recipe_args = {k: v for k, v in sorted(saved_args.items()) if k in recipe.RECIPE and v is not None}
    lines = ['---', 'library_name: timm', 'license: other', 'tags: [image-classification, timm]', '---', '',
             f"# {saved_args.get('model', arch)}", '',
             f"A {arch.split('_')[0].upper()} exported from `{checkpoint_name}` of a fast-MIM run "
             f"(LocalMIM / MAE pre-training, fine-tuning or linear probing). timm builds it from `config.json` alone "
             f"(`{arch}` with the arguments below) and loads `model.safetensors` strictly.", '',
             '```python', 'import functools, timm, torch' if arch.startswith('swin_') else 'import timm',
             f"model = {load_line(arch, 'local-dir:PATH_TO_THIS_FOLDER')}",
             f"# pushed to the Hugging Face Hub: {load_line(arch, 'hf-hub:ORG/NAME')}", '```', '',
             f'Architecture arguments: `{json.dumps(model_args)}`.', '',
             *(['Without `norm_layer`, timm builds the norms with its default eps 1e-5 (1e-6 in training): outputs '
                'then differ by about 1e-5.', ''] if arch.startswith('swin_') else []),
             '## Training arguments', '', '| argument | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in recipe_args.items()]
    lines += ['', '## Licence', '',
              'The weights carry the terms of the data they were trained on (ImageNet: non-commercial research '
              'only) and of the code that trained them.', '']
    return '\n'.join(lines)


def export_folder(state, saved_args, name, output, checkpoint):
    """config.json + model.safetensors (timm's save_for_hf) + README.md in `output`."""
    import timm
    from timm.models import save_for_hf
    arch, model_args = timm_architecture(name, state, saved_args.get('input_size', 224))
    model = timm.create_model(arch, pretrained=False, **model_args)
    model.load_state_dict(state, strict=True)
    size = model_args['img_size']
    save_for_hf(model, output, model_args=model_args, safe_serialization=True,
                data_config={'input_size': (3, size, size), 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN,
                             'std': IMAGENET_DEFAULT_STD,
                             'crop_pct': eval_crop_pct(size)})
    (Path(output) / 'README.md').write_text(model_card(arch, model_args, saved_args, Path(checkpoint).name))
    print(f"wrote {output}: config.json, model.safetensors, README.md ({arch}, {len(state)} tensors). Load it with:\n"
          f"{load_line(arch, f'local-dir:{output}')}")
    return model


def export(checkpoint, output):
    ckpt = load_checkpoint_file(checkpoint)
    saved_args = vars(models_mim.saved_args(ckpt))
    state = ckpt.get('model', ckpt)
    if not models_swin.is_localmim_swin_layout(state) and any(k.startswith('encoder.') for k in state):
        # linear probe: keep the frozen encoder
        state = {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}
    state = {k: v.contiguous() for k, v in models_vit.encoder_state_dict(state).items()}
    name = classifier_name(saved_args.get('model', ''))
    output = Path(output)
    if output.suffix not in ('.safetensors', '.pth'):
        export_folder(state, saved_args, name, output, checkpoint)
        return state
    arch, model_args = timm_architecture(name, state, saved_args.get('input_size', 224))
    if output.suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(state, str(output))
        loader = f"safetensors.torch.load_file('{output}')"
    else:
        torch.save(state, output)
        loader = f"torch.load('{output}')"
    print(f'wrote {output}: {name}, {len(state)} tensors. Load it with:')
    arguments = ', '.join(f'{k}={tuple(v) if isinstance(v, list) else v!r}' for k, v in model_args.items())
    if arch.startswith('swin_'):  # eps 1e-6 as ours, which timm's config cannot say
        print(f"timm.models.swin_transformer.SwinTransformer({arguments}, "
              f"norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).load_state_dict({loader})")
    else:
        print(f"timm.create_model('{arch}', {arguments}).load_state_dict({loader})")
    return state


def main(args):
    export(args.checkpoint, args.output)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
