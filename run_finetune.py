"""Fine-tuning a pre-trained encoder with layer-wise lr decay (BEiT rule), mixup/cutmix, RandAugment."""
import argparse

import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

import models_vit
import util.misc as misc
from util import checkpoint
from util.errors import UsageError
from engine_finetune import resume_then_evaluate_or_fit
from util.datasets import build_classification_loaders, eval_transform, finetune_transform


def get_args_parser():
    p = argparse.ArgumentParser('ViT fine-tuning')
    p.add_argument('--batch_size', default=64, type=int, help='per-GPU batch; effective = batch_size * accum_iter * GPUs')
    p.add_argument('--epochs', default=50, type=int)
    p.add_argument('--accum_iter', default=1, type=int)
    # model
    p.add_argument('--model', default='vit_base_patch16', help=f'one of {", ".join(models_vit.MODELS)}')
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth rate')
    p.add_argument('--finetune', default='', help='pre-training checkpoint (LocalMIM or MAE) to start from')
    p.add_argument('--global_pool', action='store_true', default=True, help='mean of patch tokens + fc_norm')
    p.add_argument('--cls_token', action='store_false', dest='global_pool', help='classify from the cls token')
    p.add_argument('--nb_classes', default=None, type=int, help='default: the number of class folders found')
    # optimizer
    p.add_argument('--clip_grad', type=float, default=None, help='max gradient norm (default: no clipping)')
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--lr', type=float, default=None, help='absolute lr (default: blr * effective batch / 256)')
    p.add_argument('--blr', type=float, default=1e-3, help='base lr for an effective batch of 256')
    p.add_argument('--layer_decay', type=float, default=0.75, help='lr scale per block from the head down (BEiT)')
    p.add_argument('--min_lr', type=float, default=1e-6)
    p.add_argument('--warmup_epochs', type=float, default=5)
    # augmentation
    p.add_argument('--color_jitter', type=float, default=None, help='off when RandAugment is on')
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy ("" for none)')
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    p.add_argument('--remode', default='pixel', help='random erasing mode')
    p.add_argument('--recount', type=int, default=1, help='random erasing count')
    p.add_argument('--resplit', action='store_true', help='no random erasing on the first augmentation split')
    p.add_argument('--mixup', type=float, default=0, help='mixup alpha (> 0 enables)')
    p.add_argument('--cutmix', type=float, default=0, help='cutmix alpha (> 0 enables)')
    p.add_argument('--cutmix_minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    p.add_argument('--mixup_prob', type=float, default=1.0)
    p.add_argument('--mixup_switch_prob', type=float, default=0.5)
    p.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'])
    # evaluation
    p.add_argument('--eval', action='store_true', help='only evaluate --resume (or --finetune) on val/')
    p.add_argument('--dist_eval', action='store_true', help='shard evaluation over the processes')
    misc.add_run_args(p, './output_dir_finetune')
    return p


def build_mixup(args):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise UsageError(f"mixup/cutmix pair up samples: --batch_size must be even, got {args.batch_size}")
    print('Mixup/CutMix on')
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def layer_decay_groups(model, weight_decay, layer_decay):
    """timm's param_groups_layer_decay (the BEiT rule), except that the final norm (--cls_token) gets scale 1.0
    like the head, as in facebookresearch/mae; timm's group matcher puts it with the last block."""
    final_norm = {id(p) for n, p in model.named_parameters() if n.startswith('norm.')}
    groups = []
    for g in param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=layer_decay):
        moved = [p for p in g['params'] if id(p) in final_norm]
        kept = [p for p in g['params'] if id(p) not in final_norm]
        groups += [{**g, 'params': kept}] if kept else []
        groups += [{**g, 'params': moved, 'lr_scale': 1.0}] if moved else []
    return groups


def main(args):
    device = misc.setup_run(args)
    train_loader, val_loader, train_sampler = build_classification_loaders(
        args, finetune_transform(args), eval_transform(args.input_size))
    resume = checkpoint.load_resume_checkpoint(args)  # (path, checkpoint), ('', {}) when starting
    args.accum_iter = checkpoint.run_accumulation(args, *resume)
    misc.set_schedule_steps(args, len(train_loader))
    args.train_images = len(train_loader.dataset)
    mixup_fn = build_mixup(args)

    model = models_vit.build(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                             global_pool=args.global_pool, drop_path_rate=args.drop_path,
                             **models_vit.checkpoint_kwargs(args.resume or args.finetune))
    if args.finetune and not args.eval:
        models_vit.load_pretrained(model, args.finetune)
        models_vit.init_head(model)
    model.to(device)
    print(f'Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    misc.scale_lr(args)

    groups = layer_decay_groups(model, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == 'cuda')
    loss_scaler = misc.LossScaler(device.type, enabled=args.amp == 'fp16')
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    resume_then_evaluate_or_fit(args, model, criterion, train_loader, val_loader, train_sampler, optimizer,
                                loss_scaler, device, resume, mixup_fn)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
