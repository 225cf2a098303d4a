"""k-nearest-neighbour classification of frozen encoder features (DINO's weighted vote).

Features: cls token after the final norm (default) or the mean of patch tokens, L2-normalised; the k
most cosine-similar training images vote with weight exp(similarity / temperature).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler

import models_vit
import util.misc as misc
from util import checkpoint, distributed, metrics
from util.errors import UsageError
from util.datasets import ShardSampler, eval_transform, image_folder
from util.pipeline import BadImageError, Readable, bad_image_message, collate


def get_args_parser():
    p = argparse.ArgumentParser('kNN evaluation of a pre-trained encoder')
    p.add_argument('--batch_size', default=128, type=int, help='per-process batch for feature extraction')
    p.add_argument('--model', default='vit_base_patch16', help=f'one of {", ".join(models_vit.MODELS)}')
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--finetune', default='', help='pre-training checkpoint (LocalMIM or MAE) to evaluate')
    p.add_argument('--global_pool', action='store_true', default=False, help='mean of patch tokens (+ fc_norm)')
    p.add_argument('--cls_token', action='store_false', dest='global_pool', help='cls token (default)')
    p.add_argument('--k', default=20, type=int, help='neighbours that vote')
    p.add_argument('--temperature', default=0.07, type=float, help='vote weight exp(similarity / T)')
    p.add_argument('--dump_features', default='', help='save extracted features and labels to this folder')
    p.add_argument('--load_features', default='', help='skip extraction: load features from this folder')
    misc.add_run_args(p, './output_dir_knn')
    p.set_defaults(accum_iter=1)
    return p


def collate_with_gaps(batch):
    """(the readable images, every sample's label with -1 for an unreadable one, which were readable): the features
    keep their place in the dataset's order, and the -1 rows are dropped once gathered."""
    kept = torch.tensor([b is not None for b in batch])
    images, targets, _ = collate(batch)
    labels = torch.full((len(batch),), -1, dtype=targets.dtype)
    labels[kept] = targets
    return images, labels, kept


def readable(feats, labels, split):
    """The rows of the images that could be read (label -1: skipped under --skip_bad_images), said."""
    keep = labels >= 0
    if not keep.all():
        print(f'{split}: {int((~keep).sum())} unreadable image(s) skipped')
    return feats[keep], labels[keep]


@torch.no_grad()
def extract_features(encoder, dataset, device, args):
    """L2-normalised features (N, D) and labels (N,) in dataset order; each process extracts every
    world-th image and the shards are gathered back into order."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    sampler = ShardSampler(len(dataset), rank, world) if world > 1 else SequentialSampler(dataset)
    loader = DataLoader(Readable(dataset, args.skip_bad_images), sampler=sampler, batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=collate_with_gaps)
    amp_dtype = misc.AMP_DTYPES[args.amp]
    feats, labels = [], []
    for samples, targets, kept in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = encoder.forward_head(encoder.forward_features(samples.to(device)), pre_logits=True)
        batch = torch.zeros(len(kept), f.shape[1], device=device)
        batch[kept.to(device)] = F.normalize(f.float(), dim=1)
        feats.append(batch)
        labels.append(targets.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return feats.cpu(), labels.cpu()
    shard = (len(dataset) + world - 1) // world  # pad to equal sizes for all_gather
    padded_f = torch.zeros(shard, feats.shape[1], device=device)
    padded_l = torch.full((shard,), -1, dtype=labels.dtype, device=device)
    padded_f[:len(feats)], padded_l[:len(labels)] = feats, labels
    all_f = [torch.empty_like(padded_f) for _ in range(world)]
    all_l = [torch.empty_like(padded_l) for _ in range(world)]
    dist.all_gather(all_f, padded_f)
    dist.all_gather(all_l, padded_l)
    out_f = torch.empty(len(dataset), feats.shape[1])
    out_l = torch.empty(len(dataset), dtype=labels.dtype)
    for r in range(world):
        n = len(range(r, len(dataset), world))
        out_f[r::world], out_l[r::world] = all_f[r][:n].cpu(), all_l[r][:n].cpu()
    return out_f, out_l


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes, chunk=512):
    """Top-1 and top-5 accuracy (%) of the temperature-weighted vote of the k nearest (cosine) neighbours."""
    k = min(k, len(train_feats))
    top1 = top5 = 0
    for start in range(0, len(test_feats), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # (b, N_train)
        nn_sim, nn_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_labels[nn_idx], (nn_sim / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        target = test_labels[start:start + chunk, None]
        top1 += (pred[:, :1] == target).sum().item()
        top5 += (pred == target).any(1).sum().item()
    return 100 * top1 / len(test_feats), 100 * top5 / len(test_feats)


def main(args):
    device = misc.setup_run(args)
    train = image_folder(args.data_path, 'train', eval_transform(args.input_size), args.shard_cache)
    val = image_folder(args.data_path, 'val', eval_transform(args.input_size), args.shard_cache)
    if args.load_features:
        folder = Path(args.load_features)
        saved = {n: torch.load(folder / f'{n}.pth') for n in ('train_feats', 'train_labels', 'val_feats', 'val_labels')}
        if len(saved['train_labels']) != len(train) or len(saved['val_labels']) != len(val):
            raise UsageError(f"features in {folder} are for {len(saved['train_labels'])}/{len(saved['val_labels'])} "
                             f"images, the data has {len(train)}/{len(val)}: extract them again")
        train_f, train_l, val_f, val_l = saved.values()
    else:
        encoder = models_vit.build(args.model, img_size=args.input_size, num_classes=0, global_pool=args.global_pool,
                                   **models_vit.checkpoint_kwargs(args.finetune))
        if args.finetune:
            models_vit.load_pretrained(encoder, args.finetune)
        encoder.to(device).eval()
        try:
            train_f, train_l = extract_features(encoder, train, device, args)
            val_f, val_l = extract_features(encoder, val, device, args)
        except BadImageError as e:
            raise UsageError(f"{bad_image_message(e)}; remove or replace it, or pass --skip_bad_images")
        if args.dump_features and distributed.is_main_process():
            folder = Path(args.dump_features)
            folder.mkdir(parents=True, exist_ok=True)
            for name, t in zip(('train_feats', 'train_labels', 'val_feats', 'val_labels'), (train_f, train_l, val_f, val_l)):
                checkpoint.atomic_save(t, folder / f'{name}.pth')
            print(f'features saved to {folder}')
    if distributed.is_main_process():
        (train_f, train_l), (val_f, val_l) = readable(train_f, train_l, 'train'), readable(val_f, val_l, 'val')
        top1, top5 = knn_classify(train_f, train_l, val_f, val_l, args.k, args.temperature, len(train.classes))
        print(f'kNN (k={args.k}, T={args.temperature}) on {len(val_f)} images: top-1 {top1:.2f}%  top-5 {top5:.2f}%')
        result = {'knn_top1': top1, 'knn_top5': top5, 'k': args.k, 'temperature': args.temperature,
                  'checkpoint': args.finetune or args.load_features}
        if args.output_dir:
            metrics.append_json_line(Path(args.output_dir) / 'log.txt', result)
        print(json.dumps(result))
    distributed.finish()


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
