"""The k-NN monitor: DINO's weighted vote against numpy brute force, feature extraction against a
direct forward, and the monitor on a labelled folder against both."""

import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import CLI_ENV, ROOT, accelerate_launch
from PIL import Image

from fcmae.data.labelled import eval_transform
from fcmae.models import create_fcmae, create_model
from fcmae.tasks.pretrain.evaluation import KnnMonitor, extract_features, knn_accuracy

T = 0.07


def brute_force_knn(train, train_y, test, test_y, num_classes, k, temperature=T):
    """Weighted k-NN written out: cosine similarity, k most similar, exp(s / T) summed per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test, test_y):
        sims = train @ x
        order = np.argsort(-sims)
        assert k >= len(train) or sims[order[k - 1]] > sims[order[k]]  # no tie at the k-th neighbour
        votes = np.zeros(num_classes)
        for j in order[:k]:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        top2 = np.sort(votes)[-2:]
        assert top2[1] > top2[0]  # no tie between classes
        correct += votes.argmax() == y
    return 100.0 * correct / len(test)


def clustered(n, num_classes, dim, rng, spread=1.5):
    centres = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("k", [1, 3, 20, 200])
def test_knn_accuracy_equals_brute_force(k):
    rng = np.random.default_rng(k)
    train, train_y = clustered(150, 5, 16, rng)
    test, test_y = clustered(60, 5, 16, rng)
    want = brute_force_knn(train, train_y, test, test_y, 5, k)
    got = knn_accuracy(
        torch.from_numpy(train) * 3,
        torch.from_numpy(train_y),
        torch.from_numpy(test),
        torch.from_numpy(test_y),
        5,
        k=k,
        temperature=T,
        chunk=7,
    )  # chunks of 7 test rows
    assert 0 < want < 100 and got == pytest.approx(want, abs=1e-9)
    if k == 1:  # one neighbour: plain nearest-neighbour (cosine) accuracy
        tn, sn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (train, test))
        assert got == pytest.approx(100.0 * np.mean(train_y[(sn @ tn.T).argmax(1)] == test_y), abs=1e-9)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        knn_accuracy(train, train_y + 1, test, test_y, 5, k=k)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images, labels, ok):
        self.images, self.labels, self.ok = images, labels, ok

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.ok[i]


@pytest.mark.parametrize("with_head", [False, True])
def test_extract_features_equal_a_direct_forward(with_head):
    if with_head:  # a classifier: pooled features after its head's LayerNorm
        encoder = create_model("convnextv2_atto", num_classes=4)
        torch.nn.init.normal_(encoder.head.norm.weight)
        torch.nn.init.normal_(encoder.head.norm.bias)
    else:  # the pretraining encoder: no head, the plain average
        encoder = create_fcmae("convnextv2_atto").encoder
    images, labels = torch.randn(7, 3, 64, 64), torch.arange(7) % 3
    ok = torch.tensor([True, True, False, True, True, True, True])
    encoder.eval()
    with torch.no_grad():
        pooled = encoder.forward_features(images).mean((2, 3))
        if with_head:
            norm = encoder.head.norm
            pooled = F.layer_norm(pooled, pooled.shape[1:], norm.weight, norm.bias, eps=1e-6)
    want = (pooled / pooled.norm(dim=1, keepdim=True))[ok]
    encoder.train()
    loader = torch.utils.data.DataLoader(_Batches(images, labels, ok), batch_size=3)  # last batch: 1
    feats, got_labels = extract_features(encoder, loader)
    assert encoder.training  # mode restored
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_labels, labels[ok])
    accelerator = Accelerator(cpu=True)  # one process: gather_for_metrics is the identity
    feats1, labels1 = extract_features(encoder, accelerator.prepare(loader), accelerator)
    assert torch.equal(feats1, feats) and torch.equal(labels1, labels[ok])


def _labelled_folder(root, rng, per_class):
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in per_class.items():
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-60, 60, (64, 64, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return sorted(colours)


def test_monitor_equals_brute_force_on_directly_computed_features(tmp_path):
    rng = np.random.default_rng(0)
    names = _labelled_folder(tmp_path, rng, {"train": 4, "val": 3})
    encoder = create_fcmae("convnextv2_atto").encoder
    monitor = KnnMonitor.from_folder(tmp_path, Accelerator(cpu=True), input_size=64, batch_size=5, k=5)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    row = monitor(encoder)
    assert torch.equal(torch.rand(3), expected_next)  # the training stream's random numbers are untouched
    tf = eval_transform(64)
    encoder.eval()

    def feats(split):
        files = sorted((tmp_path / split).glob("*/*.png"))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            f = encoder.forward_features(x).mean((2, 3)).numpy()
        return f, np.array([names.index(p.parent.name) for p in files])

    want = brute_force_knn(*feats("train"), *feats("val"), num_classes=3, k=5)
    assert set(row) == {"knn_acc1"} and row["knn_acc1"] == pytest.approx(want, abs=1e-9)


TWO_PROCESS_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from fcmae.models import create_fcmae
from fcmae.tasks.pretrain.evaluation import extract_features
torch.manual_seed(0)
encoder = create_fcmae("convnextv2_atto").encoder
images, labels = torch.randn(7, 3, 32, 32), torch.arange(7)
ok = torch.tensor([True, True, True, True, True, False, True])
ds = torch.utils.data.TensorDataset(images, labels, ok)
accelerator = Accelerator()
loader = accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=2))  # 2 x 2 per step: 1 padded sample
feats, got = extract_features(encoder, loader, accelerator)
torch.save({"feats": feats, "labels": got, "images": images, "state": encoder.state_dict()},
           f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
"""


@pytest.mark.slow  # starts two processes: tens of seconds on a busy 2-core machine
def test_two_processes_gather_every_image_once(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    cmd = [*accelerate_launch(), str(script), str(tmp_path)]
    proc = subprocess.run(
        cmd, env={**CLI_ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    encoder = create_fcmae("convnextv2_atto").encoder
    encoder.load_state_dict(ranks[0]["state"])
    with torch.no_grad():
        pooled = encoder.eval().forward_features(ranks[0]["images"]).mean((2, 3))
    keep = [0, 1, 2, 3, 4, 6]  # image 5 is flagged unreadable; the padded copy of image 0 is dropped
    for r in ranks:
        assert r["labels"].tolist() == keep
        torch.testing.assert_close(r["feats"], F.normalize(pooled, dim=1)[keep], rtol=1e-5, atol=1e-6)
