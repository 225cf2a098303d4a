
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from run_knn import knn_classify
from util import metrics

KNN = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0']


def test_knn_on_features_with_known_neighbours():
    # three tight clusters on orthogonal directions; each query sits next to its own cluster
    centres = torch.eye(3, 8)
    train = F.normalize(centres.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 8), dim=1)
    labels = torch.arange(3).repeat_interleave(5)
    queries = F.normalize(centres[[2, 0, 1]] + 0.05 * torch.randn(3, 8), dim=1)
    top1, top5 = knn_classify(train, labels, queries, torch.tensor([2, 0, 1]), k=5, temperature=0.07, num_classes=3)
    assert top1 == 100 and top5 == 100
    top1, _ = knn_classify(train, labels, queries, torch.tensor([0, 1, 2]), k=5, temperature=0.07, num_classes=3)
    assert top1 == 0


def test_weighted_vote_prefers_closer_neighbours():
    train = F.normalize(torch.tensor([[1., 0.], [0.6, 0.8], [0.6, 0.8]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1., 0.]])  # one very close neighbour of class 0, two far ones of class 1
    assert knn_classify(train, labels, query, torch.tensor([0]), k=3, temperature=0.07, num_classes=2)[0] == 100


@pytest.mark.slow
def test_dump_load_and_two_process_extraction(tmp_path, small_data, pretrain_ckpt):
    common = [*KNN, '--data_path', small_data, '--finetune', pretrain_ckpt]
    one = run_script('run_knn.py', *common, '--dump_features', tmp_path / 'feats', '--output_dir', tmp_path / 'a')
    loaded = run_script('run_knn.py', *KNN, '--data_path', small_data, '--load_features', tmp_path / 'feats',
                        '--output_dir', tmp_path / 'b')
    two = run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_knn.py',
                     *common, '--dump_features', tmp_path / 'feats2', '--output_dir', tmp_path / 'c')
    results = [metrics.read_json_lines(tmp_path / d / 'log.txt')[0] for d in 'abc']
    assert results[0]['knn_top1'] == results[1]['knn_top1'] == results[2]['knn_top1']
    f1, f2 = torch.load(tmp_path / 'feats/train_feats.pth'), torch.load(tmp_path / 'feats2/train_feats.pth')
    assert torch.allclose(f1, f2, atol=1e-5)  # gathered shards back in dataset order
    assert torch.equal(torch.load(tmp_path / 'feats/val_labels.pth'), torch.load(tmp_path / 'feats2/val_labels.pth'))
    assert 'kNN (k=20' in one.stdout and 'kNN' in loaded.stdout and 'kNN' in two.stdout


@pytest.mark.slow
def test_knn_on_embedded_data(tmp_path, pretrain_ckpt):
    proc = run_script('run_knn.py', *KNN, '--batch_size', '128', '--finetune', pretrain_ckpt, '--output_dir', tmp_path)
    assert 'on 300 images' in proc.stdout
