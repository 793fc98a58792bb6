"""The dashboard as TensorBoard reads it: the Adam headline chart, no empty charts, a tag count that
does not grow with depth, flag onsets at their steps, chronological events, early and explicit checks."""

import re

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import hessdiag
from hessdiag.cli import summarize
from hessdiag.dashboard import shown_scalars
from hessdiag.errors import HessdiagWarning
from hessdiag.flags import FLAG_NAMES, FlagEvent
from hessdiag.tensorboard import TensorBoardWriter


def read(logdir):
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator):
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def charts(accumulator):
    """{chart title: tags} of the latest custom-scalars layout (the one TensorBoard shows)."""
    layout = layout_pb2.Layout()
    layout.ParseFromString(accumulator.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


def texts(accumulator, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(f"{tag}/text_summary")]


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def train(model, optimizer, monitor, batch, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(batch, loss)
    monitor.flush()


def regression(seed=0, n=32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return x, x[:, :2].sum(dim=1, keepdim=True).tanh()


@pytest.mark.parametrize("update_ratios", [False, True])
def test_adam_headline_chart_and_no_empty_chart(tmp_path, update_ratios):
    """Adam's stability threshold is for the preconditioned sharpness: the headline chart must pair
    them (raw lambda_max is orders of magnitude below Adam's threshold), and every chart of the
    layout must have every series it names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = SummaryWriter(tmp_path)
    monitor = hessdiag.Monitor(
        model, mse, optimizer=optimizer, writer=writer, check_every=5, log_every=5, update_ratios=update_ratios
    )
    train(model, optimizer, monitor, regression(), 20)
    writer.close()
    accumulator = read(tmp_path)
    logged, layout = scalars(accumulator), charts(accumulator)
    headline = next(tags for title, tags in layout.items() if "hessdiag/stability_threshold" in tags)
    assert headline == ["hessdiag/sharpness", "hessdiag/stability_threshold"]
    checks = monitor.checks
    assert [v for _, v in logged["hessdiag/sharpness"]] == pytest.approx([c.sharpness for c in checks])
    for (_, sharpness), (_, threshold), (_, ratio) in zip(
        logged["hessdiag/sharpness"], logged["hessdiag/stability_threshold"], logged["hessdiag/stability_ratio"]
    ):
        assert ratio == pytest.approx(sharpness / threshold, rel=1e-5)
    # What the threshold bounds is the preconditioned sharpness, here over 5x the raw lambda_max.
    assert all(s > 5 * lm for (_, s), (_, lm) in zip(logged["hessdiag/sharpness"], logged["hessdiag/lambda_max"]))
    ratio_chart = next(tags for tags in layout.values() if "hessdiag/stability_ratio" in tags)
    assert "hessdiag/stability_ratio_limit" in ratio_chart
    assert {v for _, v in logged["hessdiag/stability_ratio_limit"]} == {1.0}
    for title, tags in layout.items():
        for pattern in tags:
            assert any(re.fullmatch(pattern, tag) for tag in logged), (title, pattern)
    assert any("layers/update_ratio" in tag for tags in layout.values() for tag in tags) == update_ratios


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=4), (torch.randn(2, 3, 32, 32), torch.randn(2, 4))


class TinyGPT(nn.Module):
    """A 12-layer pre-norm transformer of width 16: deep like a GPT, cheap on a CPU."""

    def __init__(self, depth=12, width=16, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens), mask=mask, is_causal=True)).mean(dim=1)


def gpt():
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    return TinyGPT(), (tokens, torch.randn(2, 11))


@pytest.mark.parametrize("build", [resnet18, gpt], ids=["resnet18", "gpt12"])
def test_scalar_tags_do_not_grow_with_depth(tmp_path, build):
    torch.manual_seed(0)
    model, batch = build()
    layers = sum(1 for module in model.modules() if any(True for _ in module.parameters(recurse=False)))
    assert layers > 40  # deep enough that one scalar per layer would blow the budget
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_layer_dir = tmp_path / "per_layer"
    writers = [SummaryWriter(tmp_path / "default"), SummaryWriter(per_layer_dir)]
    monitor = hessdiag.Monitor(
        model, mse, optimizer=optimizer, check_every=2, log_every=1, max_iter=3, update_ratios=True,
        writer=[writers[0], TensorBoardWriter(writers[1], per_layer_scalars=True)],
    )  # fmt: skip
    train(model, optimizer, monitor, batch, 2)
    for writer in writers:
        writer.close()
    assert len(monitor.checks) == 1
    default, per_layer = read(tmp_path / "default"), read(per_layer_dir)
    tags = default.Tags()["scalars"]
    assert "hessdiag/lambda_max" in tags and "hessdiag/layers/update_ratio/max" in tags
    assert len(tags) <= 40, sorted(tags)
    assert len(per_layer.Tags()["scalars"]) > 4 * layers  # the opt-in: every layer, four quantities
    # Per-layer detail is still there: a histogram over layers and the worst layers by name.
    for family in ("layer_grad_norms", "layer_grad_to_weights", "layer_weight_norms"):
        assert default.Histograms(f"hessdiag/{family}")[-1].histogram_value.num == len(monitor.gradients.modules)
    worst = texts(default, "hessdiag/worst_layers")[-1][1]
    rows = {row.split(" | ")[0].strip("| "): row for row in worst.splitlines()[2:]}
    assert len(rows) == 4  # the four per-layer quantities
    largest = rows["gradient norm"].split(" | ")[1]
    assert [name for name, _ in re.findall(r"(\S+) (\S+?)(?:,|$)", largest)] == _largest_grad_layers(model, k=3)


def _largest_grad_layers(model, k):
    """Names of the k modules with the largest gradient norm (over their own parameters) now."""
    norms = {}
    for name, module in model.named_modules():
        grads = [p.grad.flatten() for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            norms[name] = float(torch.cat(grads).norm())
    return sorted(norms, key=norms.get, reverse=True)[:k]
