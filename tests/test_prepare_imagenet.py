import numpy as np
from scipy.io import savemat

from conftest import run_script

WNIDS = ['n01440764', 'n01443537', 'n01484850']


def fake_devkit(root, labels):
    """The devkit's two files: meta.mat (leaf synsets 1..3 and one inner node) and the ground truth."""
    data = root / 'devkit' / 'data'
    data.mkdir(parents=True)
    synsets = np.array([(i + 1, w, 0) for i, w in enumerate(WNIDS)] + [(1001, 'n00001740', 3)],
                       dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('num_children', 'O')])
    savemat(data / 'meta.mat', {'synsets': synsets})
    (data / 'ILSVRC2012_validation_ground_truth.txt').write_text('\n'.join(map(str, labels)) + '\n')
    return root / 'devkit'


def fake_val(root, n):
    val = root / 'val'
    val.mkdir()
    for i in range(1, n + 1):
        (val / f'ILSVRC2012_val_{i:08d}.JPEG').write_bytes(b'jpeg')
    return val


def test_devkit_layout_is_arranged_and_checked(tmp_path):
    labels = [1, 2, 3, 3, 2, 1]
    devkit, val = fake_devkit(tmp_path, labels), fake_val(tmp_path, 6)
    args = ['-m', 'tools.prepare_imagenet', '--val_dir', val, '--devkit', devkit, '--expected_classes', '3',
            '--expected_per_class', '2']
    proc = run_script(*args)
    assert '6 moved' in proc.stdout and 'ok' in proc.stdout
    assert sorted(p.name for p in (val / WNIDS[2]).iterdir()) == ['ILSVRC2012_val_00000003.JPEG',
                                                                 'ILSVRC2012_val_00000004.JPEG']
    again = run_script(*args)
    assert '6 already in place' in again.stdout


def test_missing_images_are_reported(tmp_path):
    devkit, val = fake_devkit(tmp_path, [1, 2, 3, 3, 2, 1]), fake_val(tmp_path, 6)
    (val / 'ILSVRC2012_val_00000005.JPEG').unlink()
    proc = run_script('-m', 'tools.prepare_imagenet', '--val_dir', val, '--devkit', devkit, '--expected_classes', '3',
                      '--expected_per_class', '2', check=False)
    assert proc.returncode == 1
    assert 'missing: ILSVRC2012_val_00000005.JPEG' in proc.stdout and 'n01443537 (1)' in proc.stdout


def test_plain_label_file(tmp_path):
    val = fake_val(tmp_path, 4)
    labels = tmp_path / 'labels.txt'
    labels.write_text(''.join(f'ILSVRC2012_val_{i:08d}.JPEG {WNIDS[i % 2]}\n' for i in range(1, 5)))
    proc = run_script('-m', 'tools.prepare_imagenet', '--val_dir', val, '--labels', labels, '--expected_classes', '2',
                      '--expected_per_class', '2')
    assert 'ok' in proc.stdout and len(list((val / WNIDS[0]).iterdir())) == 2
