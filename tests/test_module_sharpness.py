"""Per-module sharpness: lambda_max of a module's own diagonal block, against dense float64 blocks.

A block-diagonal Hessian (two independent non-quadratic branches): each module's value is its dense
block's top eigenvalue, and the larger one the whole lambda_max. A coupled Hessian (an MLP): each
value is the top eigenvalue of the dense *diagonal block*, not of the whole Hessian (which is larger,
the cross terms adding). Bounds hold; products counted; the model left as found."""

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import hessdiag.estimators.module_sharpness
from hessdiag import HessianOperator, Monitor, hessian_eigenvalues, module_sharpness
from hessdiag.app.cli import format_summary, summarize
from hessdiag.reporting.dashboard import layout
from hessdiag.detectors import EdgeOfStabilityDetector
from hessdiag.estimators.module_sharpness import ModuleSharpness, module_block, module_sharpness_of
from hessdiag.operator import HessianBlock
from hessdiag.callbacks.settings import CallbackSettings
from hessdiag.settings import DiagnosticsSettings
from loops import one_step
from oracles import dense_hessian, flat_parameters
from spawned import rank_group


class Branches(nn.Module):
    """Two independent tanh regressions, losses added: the Hessian is block-diagonal across `a` and
    `b` and not quadratic (tanh), the `a` branch's inputs scaled up so the two blocks differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.a(3 * x)), torch.tanh(self.b(x))


def branches_loss(model, batch):
    x, y = batch
    a, b = model(x)
    return F.mse_loss(a, y) + F.mse_loss(b, y)


def branches_problem():
    torch.manual_seed(0)
    model = Branches().double()
    generator = torch.Generator().manual_seed(1)
    return model, (torch.randn(16, 3, generator=generator, dtype=torch.float64), torch.randn(16, 2, generator=generator, dtype=torch.float64))


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(1)
    return model, (torch.randn(24, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (24,), generator=generator))


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def dense_blocks(model, loss_fn, batch):
    """The whole dense Hessian and each module's dense diagonal block, by slicing in parameter order."""
    hessian = dense_hessian(model, loss_fn, batch)
    blocks, offset = {}, 0
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0] or name  # a root parameter owns itself
        blocks.setdefault(owner, []).extend(range(offset, offset + p.numel()))
        offset += p.numel()
    return hessian, {owner: hessian[index][:, index] for owner, index in blocks.items()}


def top(matrix):
    return float(torch.linalg.eigvalsh(matrix)[-1])


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_on_a_block_diagonal_hessian_each_module_is_its_dense_block(method):
    model, batch = branches_problem()
    hessian, blocks = dense_blocks(model, branches_loss, batch)
    assert hessian[:8, 8:].abs().max() == 0  # block-diagonal across the two modules (8 parameters each)
    results = module_sharpness(model, branches_loss, batch, ["a", "b"], hvp_method=method, tol=1e-6)
    assert list(results) == ["a", "b"]
    for module, result in results.items():
        expected = top(blocks[module])
        assert result.converged
        assert abs(result.lambda_max - expected) <= result.error_bounds["top"][0] + 1e-9 * abs(expected)
        assert result.lambda_max == pytest.approx(expected, rel=1e-5)
    assert max(top(b) for b in blocks.values()) == pytest.approx(top(hessian), rel=1e-12)
    assert top(blocks["a"]) > 2 * top(blocks["b"])  # the two blocks are told apart


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_on_a_coupled_hessian_each_module_is_its_diagonal_block_not_the_whole(method):
    model, batch = mlp_problem()
    hessian, blocks = dense_blocks(model, cross_entropy, batch)
    whole = top(hessian)
    results = module_sharpness(model, cross_entropy, batch, ["2", "0"], hvp_method=method, tol=1e-6)
    for module, result in results.items():
        expected = top(blocks[module])
        assert expected < whole * 0.999  # the cross terms matter: the block is not the whole
        assert result.converged
        assert abs(result.lambda_max - expected) <= result.error_bounds["top"][0] + 1e-9 * abs(expected)
        assert result.lambda_max == pytest.approx(expected, rel=1e-5)
        assert result.lanczos.top_vectors.shape[1] == blocks[module].shape[0]  # vectors over the module only


def test_the_root_module_and_a_subset_of_params():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
            self.body = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.scale * torch.tanh(self.body(x))

    torch.manual_seed(0)
    model = Scaled()
    _, batch = mlp_problem()
    _, blocks = dense_blocks(model, cross_entropy, batch)
    result = module_sharpness(model, cross_entropy, batch, ["scale"], hvp_method="double_backward", tol=1e-8)["scale"]
    assert result.lambda_max == pytest.approx(top(blocks["scale"]), rel=1e-6)  # a 1x1 block: the second derivative
    # Over `params` = the body's weight only: the block is that weight's, its bias left out.
    result = module_sharpness(model, cross_entropy, batch, ["body"], params=[model.body.weight], hvp_method="double_backward", tol=1e-8)
    assert result["body"].lambda_max == pytest.approx(top(blocks["body"][:12, :12]), rel=1e-6)


def test_each_module_costs_its_lanczos_products_and_the_model_is_left_as_found():
    model, batch = mlp_problem()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before, rng = flat_parameters(model).clone(), torch.get_rng_state()
    model.eval()
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        start = operator.num_hvps
        results = module_sharpness_of(operator, ["0", "2"], tol=1e-3)
        spent = operator.num_hvps - start
    assert spent == sum(r.num_hvps for r in results.values()) and all(r.num_hvps >= 3 for r in results.values())
    assert torch.equal(flat_parameters(model), before) and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert not model.training
    record = ModuleSharpness.of("0", results["0"])
    assert record.lambda_max == results["0"].lambda_max and record.num_hvps == results["0"].num_hvps


def test_a_warm_start_from_the_top_ritz_vector_gives_the_same_value():
    model, batch = mlp_problem()
    _, blocks = dense_blocks(model, cross_entropy, batch)
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        whole = hessian_eigenvalues(model, cross_entropy, batch, hvp_method="double_backward")
        results = module_sharpness_of(operator, ["0", "2"], tol=1e-6, v0=whole.top_vectors[0])
    for module, result in results.items():
        assert result.lambda_max == pytest.approx(top(blocks[module]), rel=1e-5)


def test_the_block_maps_vectors_as_the_dense_block_does():
    model, batch = mlp_problem()
    _, blocks = dense_blocks(model, cross_entropy, batch)
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        block = module_block(operator, "2")
        assert isinstance(block, HessianBlock) and block.dim == block.size == 18 and block.shard is None
        v = torch.randn(18, dtype=torch.float64)
        torch.testing.assert_close(block.matvec(v), blocks["2"] @ v)
        torch.testing.assert_close(block.restrict(block.embed(v)), v)
        assert block.embed(v)[:25].abs().max() == 0  # zero outside the module (the first layer: 20 + 5)
        with pytest.raises(ValueError, match=r"shape \(18,\)"):
            block.matvec(torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="not one of the operator's parameters"):
            HessianBlock(operator, [nn.Parameter(torch.zeros(2))])
        with pytest.raises(ValueError, match="same parameter twice"):
            HessianBlock(operator, [model[0].weight, model[0].weight])


def test_bad_modules_name_the_argument():
    model, batch = mlp_problem()
    with pytest.raises(ValueError, match="owns none of the parameters.*'0', '2'"):
        module_sharpness(model, cross_entropy, batch, ["1"])
    for bad in ("0", [], ["0", "0"], [0]):
        with pytest.raises(ValueError, match="`modules`"):
            module_sharpness(model, cross_entropy, batch, bad)


# -- in the checks: off by default, the Monitor's record, tags, text and evidence ---------------------


def checked_mlp(module_sharpness, **options):
    model, batch = mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(
        model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, density_every=0, noise_scale_parts=0,
        hvp_method="double_backward", module_sharpness=module_sharpness, **options,
    )  # fmt: skip
    one_step(model, optimizer, cross_entropy, batch, monitor)
    return model, batch, monitor


def test_off_by_default_it_costs_no_product(monkeypatch):
    assert DiagnosticsSettings().module_sharpness == 0 and CallbackSettings().module_sharpness == 0

    def refuse(*args, **kwargs):
        raise AssertionError("module sharpness measured while off")

    _, _, on = checked_mlp(2)
    monkeypatch.setattr(hessdiag.estimators.module_sharpness, "module_sharpness_of", refuse)
    _, _, off = checked_mlp(0)
    assert off.last_check.module_sharpness == () and len(on.last_check.module_sharpness) == 2
    # The same check, the same products, but for each module's own Lanczos run.
    extra = sum(block.num_hvps for block in on.last_check.module_sharpness)
    assert off.last_check.num_hvps == on.last_check.num_hvps - extra
    assert not any(tag.startswith("hessdiag/module_sharpness/") for tag in off.latest)


def test_a_check_measures_the_top_modules_blocks_against_dense_ones(tmp_path):
    writer = SummaryWriter(tmp_path)
    model, batch, monitor = checked_mlp(2, writer=writer)
    writer.close()
    check = monitor.last_check
    _, blocks = dense_blocks(model, cross_entropy, batch)  # the parameters the check saw (after the step)
    assert [b.module for b in check.module_sharpness] == [module for module, _ in check.top_shares[:2]]
    for block in check.module_sharpness:
        expected = top(blocks[block.module])
        assert block.converged and abs(block.lambda_max - expected) <= block.error_bound + 1e-9 * expected
        assert block.lambda_max <= check.lambda_max + check.error_bound_max  # interlacing
        assert monitor.latest[f"hessdiag/module_sharpness/{block.module}"] == block.lambda_max
    assert len([tag for tag in monitor.latest if tag.startswith("hessdiag/module_sharpness/")]) == 2
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    card = accumulator.Tensors("hessdiag/layer_shares/text_summary")[-1].tensor_proto.string_val[0].decode()
    first = check.module_sharpness[0]
    assert f"`{first.module}` alone has lambda_max {first.lambda_max:.4g} of the whole {check.lambda_max:.4g}." in card
    charts = layout(accumulator.Tags()["scalars"])
    assert any("module_sharpness" in title for category in charts.values() for title in category)
    sharpest = max(check.module_sharpness, key=lambda block: block.lambda_max)
    (summary,) = summarize(tmp_path)
    assert format_summary(summary).count("sharpest module alone") == 1
    assert summary.sharpest_module == (
        f"sharpest module alone (its own Hessian block): `{sharpest.module}`, lambda_max {sharpest.lambda_max:.4g} "
        f"of the whole {check.lambda_max:.4g} (step {check.step})"
    )


def test_the_edge_of_stability_evidence_names_the_modules_own_lambda_max():
    model, batch = mlp_problem()
    # lr so high that the sharpness is beyond 2/lr: the flag rises on the second check.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    lambda_max = hessian_eigenvalues(model, cross_entropy, batch).lambda_max
    optimizer.param_groups[0]["lr"] = 2.5 / lambda_max
    monitor = Monitor(
        model, cross_entropy, optimizer=optimizer, check_every=1, log_every=1, density_every=0, noise_scale_parts=0,
        module_sharpness=1, detectors=[EdgeOfStabilityDetector(onset=1)],
    )  # fmt: skip
    one_step(model, optimizer, cross_entropy, batch, monitor)
    check = monitor.last_check
    event = next(e for e in monitor.events if e.name == "edge_of_stability")
    block = check.module_sharpness[0]
    assert event.evidence["top_module_lambda_max"] == block.lambda_max
    assert f"`{block.module}` alone has lambda_max {block.lambda_max:.4g} of the whole {check.lambda_max:.4g}." in event.summary


def test_the_setting_is_validated_and_reaches_the_probe():
    for bad in (-1, 6, True, 1.5, "2"):
        with pytest.raises(ValueError, match="`module_sharpness` must be an int in \\[0, 5\\]"):
            DiagnosticsSettings(module_sharpness=bad)
    assert CallbackSettings(module_sharpness=3).diagnostics(10).module_sharpness == 3
    model, _ = mlp_problem()
    assert Monitor(model, cross_entropy, module_sharpness=4).probe.settings.module_sharpness == 4


def test_a_run_with_module_sharpness_is_bit_for_bit_unchanged():
    def run(count):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
        _, batch = mlp_problem()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        monitor = None if count is None else Monitor(model, cross_entropy, optimizer=optimizer, check_every=2, log_every=1, module_sharpness=count)
        for _ in range(4):
            one_step(model, optimizer, cross_entropy, batch, monitor)
        if monitor is not None:
            assert len(monitor.checks) == 2 and all(len(c.module_sharpness) == count for c in monitor.checks)
        return model.state_dict(), optimizer.state_dict()["state"], torch.get_rng_state(), [p.grad for p in model.parameters()]

    plain, watched = run(None), run(2)
    assert torch.equal(plain[2], watched[2])
    for name, value in plain[0].items():
        assert torch.equal(watched[0][name], value), name
    for index, state in plain[1].items():
        assert all(torch.equal(watched[1][index][k], v) for k, v in state.items())
    for a, b in zip(plain[3], watched[3]):
        assert torch.equal(a, b)


# -- FSDP2 shards and DDP ranks: the global block, not a rank's ------------------------------------

RANK_SPLIT = (5, 11)  # unequal local batches


def ranked_model():
    torch.manual_seed(0)
    # 5 output rows shard unevenly over two ranks (3 + 2); GELU and tanh keep the loss smooth.
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def ranked_batches():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(RANK_SPLIT), 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(RANK_SPLIT),), generator=generator)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def _ranks_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    with rank_group(rank, world_size, init_file):
        batch, found = ranked_batches()[rank], {}
        model = ranked_model()  # replicated: data parallel, the loss over both ranks' samples
        found["ddp"] = module_sharpness(model, cross_entropy, batch, ["0", "4"], hvp_method="double_backward", tol=1e-6)
        sharded = ranked_model()
        for layer in sharded:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(sharded)  # FSDP2: the mean of the ranks' losses, finite differences
        found["fsdp"] = module_sharpness(sharded, cross_entropy, batch, ["0", "4"], tol=1e-6)
        with HessianOperator(sharded, cross_entropy, batch) as operator:
            block = module_block(operator, "0")
            found["sizes"] = (block.size, block.dim)
        summary = {
            kind: {m: (r.lambda_max, float(r.error_bounds["top"][0]), r.converged, r.num_hvps) for m, r in results.items()}
            for kind, results in found.items() if kind != "sizes"
        }  # fmt: skip
        torch.save(summary | {"sizes": found["sizes"]}, f"{out_dir}/rank{rank}.pt")


def test_under_fsdp2_and_ddp_each_rank_gets_the_global_block(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    mp.spawn(_ranks_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, shards = ranked_model(), ranked_batches()
    x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    _, union = dense_blocks(model, cross_entropy, (x, y))  # DDP weighs ranks by samples by default
    _, mean = dense_blocks(model, lambda m, b: sum(cross_entropy(m, s) for s in b) / 2, shards)  # FSDP: mean of ranks
    for kind, blocks in (("ddp", union), ("fsdp", mean)):
        assert ranks[0][kind] == ranks[1][kind]  # every rank decides alike
        for module, (value, bound, converged, _) in ranks[0][kind].items():
            expected = top(blocks[module])
            assert converged and abs(value - expected) <= bound + 1e-9 * expected, (kind, module)
            assert value == pytest.approx(expected, rel=1e-4), (kind, module)
    (first, dim), (second, _) = ranks[0]["sizes"], ranks[1]["sizes"]
    assert dim == 25 and first + second == dim and first != dim  # the block's vectors are local pieces
