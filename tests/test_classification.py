import pytest
import torch
import torch.nn.functional as F

from tokenformer.classification import ClassificationTask, Evaluation, confusion_matrix, write_confusion_matrix_png
from tokenformer.data.vision import FASHION_MNIST_DIR, ImageBatches, ImageDataset, channel_stats, load_fashion_mnist
from tokenformer.vision import TokenformerViT, VisionConfig


def test_confusion_matrix_by_hand():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(confusion_matrix(predictions, labels, 3), expected)
    with pytest.raises(ValueError, match=r"predictions must lie in 0..2, got 3..3"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="must have the same shape"):
        confusion_matrix(torch.tensor([1, 2]), torch.tensor([0]), 3)


def tiny_setup(n=20, classes=("a", "b", "c")):
    cfg = VisionConfig(
        image_size=8,
        patch_size=4,
        in_channels=1,
        num_classes=len(classes),
        d_model=16,
        n_layers=1,
        n_heads=2,
        qkv_tokens=8,
        proj_tokens=8,
        ffn_tokens=16,
        patch_tokens=8,
        head_tokens=8,
    )
    data = ImageDataset(
        torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8), torch.arange(n) % len(classes), tuple(classes)
    )
    return TokenformerViT(cfg), ImageBatches(data, 6, *channel_stats(data))


def test_evaluate_matches_a_manual_pass():
    model, batches = tiny_setup()
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    logits = model(images)
    task = ClassificationTask(("a", "b", "c"))
    result = task.evaluate(model, batches)
    assert result.count == 20 and model.training  # the mode is restored
    assert result.accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert torch.equal(result.confusion, confusion_matrix(logits.argmax(-1), labels, 3))
    assert task.loss(model, next(iter(batches))).item() == pytest.approx(
        F.cross_entropy(logits[:6], labels[:6]).item(), rel=1e-5
    )
    summary = result.to_dict()
    assert summary["count"] == 20 and len(summary["per_class_accuracy"]) == 3


def test_label_smoothing_changes_the_training_loss_only():
    model, batches = tiny_setup()
    images, labels = next(iter(batches))
    logits = model(images)
    smooth = ClassificationTask(("a", "b", "c"), label_smoothing=0.3)
    # The smoothed target: 1 - 0.3 on the true class plus 0.3 spread evenly over all three.
    target = F.one_hot(labels, 3).float() * 0.7 + 0.1
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert smooth.loss(model, (images, labels)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert smooth.loss(model, (images, labels)).item() != pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-3
    )
    assert smooth.evaluate(model, batches).loss == ClassificationTask(("a", "b", "c")).evaluate(model, batches).loss
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got"):
            ClassificationTask("abc", label_smoothing=bad)


def test_evaluate_errors():
    model, batches = tiny_setup()
    with pytest.raises(ValueError, match=r"logits of shape \(6, 3\); expected \[6, 4\] for 4 classes"):
        ClassificationTask("abcd").evaluate(model, batches)
    with pytest.raises(ValueError, match="no batches"):
        ClassificationTask("abc").evaluate(model, [])
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassificationTask(["only"])


def test_confusion_matrix_png(tmp_path):
    import matplotlib.image

    result = Evaluation(0.5, 0.75, torch.tensor([[5, 1, 0], [0, 4, 2], [1, 0, 7]]))
    assert result.per_class_accuracy == pytest.approx([5 / 6, 4 / 6, 7 / 8])
    path = write_confusion_matrix_png(
        result.confusion, ["T-shirt/top", "Trouser", "Bag"], tmp_path / "plots" / "confusion.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.05  # a drawn figure, not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"shape \(3, 3\) does not match 2 class names"):
        write_confusion_matrix_png(result.confusion, ["a", "b"], tmp_path / "x.png")


@pytest.fixture
def one_thread():
    # Matrices this small gain nothing from a second thread, and on a busy CPU a contended
    # thread pool makes every step several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_few_hundred_steps_on_fashion_mnist_beat_chance(one_thread):
    torch.manual_seed(0)
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    mean, std = channel_stats(train)
    cfg = VisionConfig.from_preset(
        "fmnist-0.3M",
        pool="mean",
        d_model=32,
        n_layers=2,
        n_heads=2,
        qkv_tokens=32,
        proj_tokens=32,
        ffn_tokens=64,
        patch_tokens=32,
        head_tokens=32,
    )
    model = TokenformerViT(cfg)
    task = ClassificationTask(train.classes)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=3e-3)
    batches = ImageBatches(train, 64, mean, std, shuffle=True, seed=0).epoch(0)
    for _ in range(300):
        loss = task.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held_out = ImageDataset(test.images[:2000], test.labels[:2000], test.classes)
    result = task.evaluate(model, ImageBatches(held_out, 500, mean, std))
    assert result.accuracy > 0.5, result.to_dict()  # chance is 0.1; this run reaches about 0.7
