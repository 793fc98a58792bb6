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
from hessdiag.app.cli import summarize
from hessdiag.reporting.dashboard import shown_scalars
from hessdiag.errors import HessdiagWarning
from hessdiag.flags import FLAG_NAMES, FlagEvent
from hessdiag.reporting.tags import CHECK_QUANTITY_TAGS
from hessdiag.reporting.tensorboard import TensorBoardWriter


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
    return {chart.title: [series(tag) for tag in chart.multiline.tag] for category in layout.category for chart in category.chart}


def series(pattern):
    """The tag an anchored chart pattern names (per-layer patterns stay regular expressions)."""
    return re.sub(r"\\(.)", r"\1", pattern[1:-1]) if pattern.startswith("^") and pattern.endswith("$") else pattern


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
    """Adam's stability threshold is for the preconditioned sharpness: the headline ratio is theirs
    (raw lambda_max is orders of magnitude below Adam's threshold); each chart holds series of one
    scale and one sampling, so that none is flattened or crossed by another's joined points; every
    chart of the layout has every series it names."""
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
    assert ["hessdiag/sharpness"] in layout.values() and ["hessdiag/stability_threshold"] in layout.values()
    threshold = max(v for _, v in logged["hessdiag/stability_threshold"])
    assert threshold > 100 * max(v for _, v in logged["hessdiag/sharpness"])  # one chart would flatten the sharpness
    flags_chart = next(tags for title, tags in layout.items() if title.startswith("active flags"))
    for title, tags in layout.items():
        steps = [{step for step, _ in logged[tag]} for tag in tags if tag in logged]
        assert tags == flags_chart or all(s <= steps[0] for s in steps[1:]), title  # sampled at the headline's steps
        if "hessdiag/sharpness" in tags:
            assert "hessdiag/stability_threshold" not in tags, title
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
    """torchvision's ResNet-18 on 16x16 images; its checks cover the head only (the tags are the
    same, and double backward through 11 M conv parameters takes tens of seconds on a busy CPU)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    return model, (torch.randn(2, 3, 16, 16), torch.randn(2, 4)), list(model.fc.parameters())


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
    return TinyGPT(), (tokens, torch.randn(2, 11)), None


@pytest.mark.parametrize("build", [resnet18, gpt], ids=["resnet18", "gpt12"])
def test_scalar_tags_do_not_grow_with_depth(tmp_path, build):
    torch.manual_seed(0)
    model, batch, check_params = build()
    layers = sum(1 for module in model.modules() if any(True for _ in module.parameters(recurse=False)))
    assert layers > 40  # deep enough that one scalar per layer would blow the budget
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_layer_dir = tmp_path / "per_layer"
    writers = [SummaryWriter(tmp_path / "default"), SummaryWriter(per_layer_dir)]
    monitor = hessdiag.Monitor(
        model, mse, optimizer=optimizer, check_every=2, log_every=1, max_iter=3, params=check_params, update_ratios=True,
        writer=[writers[0], TensorBoardWriter(writers[1], per_layer_scalars=True)],
    )  # fmt: skip
    train(model, optimizer, monitor, batch, 2)
    for writer in writers:
        writer.close()
    assert len(monitor.checks) == 1
    default, per_layer = read(tmp_path / "default"), read(per_layer_dir)
    tags = default.Tags()["scalars"]
    assert "hessdiag/lambda_max" in tags and "hessdiag/layers/update_ratio/max" in tags
    # The budget: 40 for the spectrum, the gradients and the flags, plus the fixed set of the quantities
    # a check adds (curvature along the gradient, headroom, noise scale, ...): constant in depth.
    assert len(tags) <= 40 + len(CHECK_QUANTITY_TAGS), sorted(tags)
    assert len(per_layer.Tags()["scalars"]) > 4 * layers  # the opt-in: every layer, four quantities
    # Per-layer detail is still there: a histogram over layers and the worst layers by name.
    for family in ("layer_grad_norms", "layer_grad_to_weights", "layer_weight_norms"):
        assert default.Histograms(f"hessdiag/{family}")[-1].histogram_value.num == len(monitor.statistics.gradients.modules)
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


def event(name, step, kind, summary="seen"):
    return FlagEvent(name=name, step=step, kind=kind, severity="warning", evidence={"x": 1.0}, remedy="act", summary=summary)


def flag_values(active=()):
    return {f"hessdiag/flags/{name}": float(name in active) for name in FLAG_NAMES}


def test_onsets_are_spikes_at_their_steps_and_the_event_log_reads_in_order(tmp_path):
    """Events reach the writer after the scalars of their read-back and may be earlier steps: the
    onset series is a spike at each onset step and 0 everywhere else."""
    summary_writer = SummaryWriter(tmp_path)
    writer = TensorBoardWriter(summary_writer)
    writer.scalars(10, flag_values(), {})
    writer.scalars(20, flag_values(["exploding"]), {})  # read-back of steps 11-20
    writer.events(20, [event("exploding", 12, "onset", "the loss rose")])
    writer.scalars(20, {"hessdiag/lambda_max": 2.0} | flag_values(["exploding", "saddle"]), {})  # a check at 20
    writer.events(20, [event("saddle", 20, "onset", "negative curvature")])
    writer.scalars(30, flag_values(["saddle"]), {})
    writer.events(30, [event("exploding", 27, "cleared", "the loss fell")])
    writer.flush()
    summary_writer.close()
    accumulator = read(tmp_path)
    assert scalars(accumulator)["hessdiag/flag_onsets"] == [
        (10, 0.0), (11, 0.0), (12, 1.0), (13, 0.0), (19, 0.0), (20, 1.0), (21, 0.0), (30, 0.0)]  # fmt: skip
    assert scalars(accumulator)["hessdiag/active_flags"] == [(10, 0.0), (20, 1.0), (20, 2.0), (30, 1.0)]
    log = texts(accumulator, "hessdiag/event_log")[-1][1]
    assert re.findall(r"^- step (\d+): `(\w+)` (\w+):", log, flags=re.MULTILINE) == [
        ("12", "exploding", "raised"), ("20", "saddle", "raised"), ("27", "exploding", "cleared")]  # fmt: skip
    cards = texts(accumulator, "hessdiag/events/exploding")
    assert [step for step, _ in cards] == [12, 27]
    assert cards[1][1].startswith("**exploding** cleared at step 27 (raised at step 12, active 15 steps)")
    assert "Remedy" in cards[0][1] and "Remedy" not in cards[1][1]
    history = summarize(tmp_path)[0].flags
    assert [(flag.name, flag.episodes) for flag in history] == [("saddle", [(20, None)]), ("exploding", [(12, 27)])]


def test_onset_steps_of_a_real_explosion_match_the_monitor(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    writer = SummaryWriter(tmp_path)
    monitor = hessdiag.Monitor(model, mse, optimizer=optimizer, writer=writer, check_every=7, log_every=10)
    with pytest.warns(HessdiagWarning):  # checks on a diverged model fail
        train(model, optimizer, monitor, regression(), 40)
    writer.close()
    onsets = sorted({e.step for e in monitor.events if e.kind == "onset"})
    assert "exploding" in {e.name for e in monitor.events} and any(step % 10 for step in onsets)
    accumulator = read(tmp_path)
    spikes = scalars(accumulator)["hessdiag/flag_onsets"]
    assert sorted(step for step, value in spikes if value > 0) == onsets
    assert {value for _, value in spikes} == {0.0, 1.0}
    exploding = next(flag for flag in summarize(tmp_path)[0].flags if flag.name == "exploding")
    assert exploding.first_step == next(e.step for e in monitor.events if e.name == "exploding")


def test_shown_scalars_summarise_layers_and_keep_the_rest():
    values = {"hessdiag/grad_norm": 3.0, "hessdiag/lambda_min": -0.5, "hessdiag/negative_curvature_certified": 1.0}
    layers = {"layer_grad_norm": {f"block{i}": float(i) for i in range(7)} | {"broken": float("inf")}}
    shown = shown_scalars(values, layers)
    assert shown["hessdiag/grad_norm"] == 3.0 and not any("block" in tag for tag in shown)
    assert [shown[f"hessdiag/layers/grad_norm/{s}"] for s in ("max", "median", "min")] == [6.0, 3.0, 0.0]
    assert shown["hessdiag/lambda_min_certified"] == -0.5
    assert shown_scalars(values | {"hessdiag/negative_curvature_certified": 0.0})["hessdiag/lambda_min_certified"] == 0.0
    assert shown_scalars(values, layers, per_layer_scalars=True)["hessdiag/layer_grad_norm/block6"] == 6.0
    assert shown_scalars(values, {"layer_grad_norm": {"a/b.c": 2.0}}, per_layer_scalars=True)["hessdiag/layer_grad_norm/a/b.c"] == 2.0


def test_the_first_auto_reading_comes_early_and_a_run_without_checks_says_so_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = hessdiag.Monitor(model, mse, optimizer=optimizer, log_every=5)  # check_every="auto"
    train(model, optimizer, monitor, regression(), 12)
    assert [reading.step for reading in monitor.readings] + [check.step for check in monitor.checks] == [10]

    writer = SummaryWriter(tmp_path)
    monitor = hessdiag.Monitor(model, mse, optimizer=optimizer, writer=writer, check_every=50, log_every=5)
    with pytest.warns(HessdiagWarning, match="no curvature check ran in these 8 steps .the first was due at step 50") as caught:
        train(model, optimizer, monitor, regression(), 8)
        monitor.flush()
    assert len([w for w in caught if "no curvature check" in str(w.message)]) == 1
    writer.close()
    assert len(texts(read(tmp_path), "hessdiag/events/no_check")) == 1


def test_runs_sharing_a_directory_register_one_layout_and_patterns_draw_exactly_their_series():
    from hessdiag.reporting.dashboard import layout
    from hessdiag.reporting.tags import LOSS, LOSS_CHANGE_ALONG_BOTTOM, STABILITY_RATIO, FLAG_ONSETS

    with_checks = layout([LOSS, LOSS_CHANGE_ALONG_BOTTOM, STABILITY_RATIO, FLAG_ONSETS])
    without_checks = layout([LOSS, FLAG_ONSETS])  # a run whose every check failed
    shared = {title: chart for category in without_checks.values() for title, chart in category.items()}
    for category in with_checks.values():
        for title, chart in category.items():
            assert title not in shared or shared[title] == chart  # identical charts merge into one
    assert not any("sharpness / threshold" in title for title in shared)  # no curvature chart without a check
    loss_chart = next(chart for title, chart in shared.items() if title.startswith("training loss"))
    patterns = loss_chart[1]
    assert any(re.search(p, LOSS) for p in patterns) and not any(re.search(p, LOSS_CHANGE_ALONG_BOTTOM) for p in patterns)


def test_the_headroom_chart_shows_the_line_at_1_on_a_bounded_scale():
    """A headroom of 300 beside its line at 1 puts the line on the axis: the chart shows lr / the
    largest stable lr (1 / headroom) with the line, and the headroom alone."""
    shown = shown_scalars({"hessdiag/lr_headroom": 300.0})
    assert shown["hessdiag/lr_fraction_of_stable"] == pytest.approx(1 / 300) and shown["hessdiag/lr_headroom_limit"] == 1.0
    assert shown_scalars({"hessdiag/lr_headroom": 0.5})["hessdiag/lr_fraction_of_stable"] == 2.0  # overshoots
    assert "hessdiag/lr_fraction_of_stable" not in shown_scalars({"hessdiag/lr_headroom": float("nan")})
    from hessdiag.reporting.dashboard import layout

    charts = {title: [series(p) for p in chart[1]] for c in layout(shown).values() for title, chart in c.items()}
    assert ["hessdiag/lr_fraction_of_stable", "hessdiag/lr_headroom_limit"] in charts.values()
    assert ["hessdiag/lr_headroom"] in charts.values()


def test_a_pipe_in_a_summary_keeps_the_event_log_and_the_card_whole(tmp_path):
    from tensorboard.plugin_util import markdown_to_safe_html

    summary = "Slowed near a point with certified negative curvature: |lambda_min| = 0.3 | lambda_max = 2."
    summary_writer = SummaryWriter(tmp_path)
    writer = TensorBoardWriter(summary_writer)
    saddle = FlagEvent("saddle", 20, "onset", "warning", {"lambda|min": -0.3}, "act", summary)
    writer.events(20, [saddle])
    summary_writer.close()
    accumulator = read(tmp_path)
    for tag in ("hessdiag/event_log", "hessdiag/events/saddle"):
        html = markdown_to_safe_html(texts(accumulator, tag)[-1][1])
        assert "|lambda_min| = 0.3 | lambda_max = 2." in html, html
    card = markdown_to_safe_html(texts(accumulator, "hessdiag/events/saddle")[-1][1])
    assert "<td>lambda|min</td>" in card  # an evidence name with a pipe stays one cell


def test_the_event_log_grows_linearly_with_the_events(tmp_path):
    """Every read-back with events writes one entry of the log: the bytes written per event must not
    grow as events accumulate (a whole-log rewrite grew them with the square of the run)."""
    summary_writer = SummaryWriter(tmp_path)
    writer = TensorBoardWriter(summary_writer)
    (path,) = tmp_path.glob("events.out.tfevents.*")
    per_block = []
    for block in range(6):
        before = path.stat().st_size
        for step in range(block * 400, (block + 1) * 400, 2):
            kind = "onset" if step % 4 == 0 else "cleared"
            writer.events(step, [event("plateau", step, kind, "the loss stopped moving well above its floor")])
        summary_writer.flush()
        per_block.append(path.stat().st_size - before)
    summary_writer.close()
    assert max(per_block) <= 1.05 * per_block[1], per_block  # the same bytes per event, early and late
    latest = texts(read(tmp_path), "hessdiag/event_log")[-1][1]
    assert "Flag events 1190-1200 of 1200" in latest and len(re.findall(r"^- step", latest, flags=re.MULTILINE)) == 11


@pytest.mark.parametrize(
    ("scale", "se", "resolved"),
    [(770.0, 910.0, False), (770.0, 400.0, False), (770.0, None, False), (770.0, 380.0, True), (20.0, 4.0, True)],
)
def test_the_noise_scale_verdict_waits_for_a_resolved_estimate(scale, se, resolved):
    """No advice on the batch while the standard error exceeds half the value: 770 +- 910 could as
    well be 64 as 1,700."""
    from hessdiag.noise.verdict import noise_scale_verdict

    sentence = noise_scale_verdict(scale, se, 64)
    assert ("not resolved yet" not in sentence) == resolved, sentence
    assert ("batch would" in sentence or "smaller batch" in sentence) == resolved
