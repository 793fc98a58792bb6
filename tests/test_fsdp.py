"""FSDP2 (`fully_shard`) on two gloo processes: the Hessian of the loss FSDP averages, from shards."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hessdiag import HessianOperator, HessdiagError, MicroBatches, Monitor, hessian_eigenvalues
from hessdiag.steps.gradients import GradientStats
from hessdiag.estimators.spectrum import slq_density
from oracles import dense_hessian
from spawned import rank_group

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

SPLIT = (5, 11)  # unequal local batches: FSDP averages the ranks' mean losses with equal weights


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # 5 output rows shard unevenly over two ranks (3 + 2); GELU and tanh keep the loss smooth.
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def make_data(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), 4, generator=generator).to(dtype)  # the same numbers in both dtypes
    y = torch.randint(0, 3, (sum(SPLIT),), generator=generator)
    return x, y


def local_batch(rank: int, dtype: torch.dtype):
    x, y = make_data(dtype)
    start = sum(SPLIT[:rank])
    return x[start : start + SPLIT[rank]], y[start : start + SPLIT[rank]]


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer)
    return fsdp.fully_shard(model)


class TinyLanguageModel(nn.Module):
    """GPT-shaped: token and position embeddings, pre-norm residual blocks, final norm, head."""

    VOCAB, WIDTH, LENGTH = 7, 4, 3

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(self.VOCAB, self.WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(self.LENGTH, self.WIDTH))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(self.WIDTH), nn.Linear(self.WIDTH, self.WIDTH), nn.GELU()) for _ in range(2)
        )
        self.norm = nn.LayerNorm(self.WIDTH)
        self.head = nn.Linear(self.WIDTH, self.VOCAB)

    def forward(self, tokens):
        hidden = self.embedding(tokens) + self.position
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(self.norm(hidden))


def lm_loss(m, batch):
    return F.cross_entropy(m(batch[0]).reshape(-1, TinyLanguageModel.VOCAB), batch[1].reshape(-1))


def make_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyLanguageModel().double()


def lm_batch(rank: int):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TinyLanguageModel.VOCAB, (6, TinyLanguageModel.LENGTH), generator=generator)
    targets = torch.randint(0, TinyLanguageModel.VOCAB, (6, TinyLanguageModel.LENGTH), generator=generator)
    return tokens[3 * rank : 3 * rank + 3], targets[3 * rank : 3 * rank + 3]


#: The usual recipes, each leaving parameters to the root's group: (name, model, its sharding, loss, batch).
RECIPES = {
    "whole": (lambda: make_model(torch.float64), lambda m, raf: fsdp.fully_shard(m, reshard_after_forward=raf),
              loss_fn, lambda rank: local_batch(rank, torch.float64)),
    "blocks": (make_lm, lambda m, raf: [fsdp.fully_shard(b, reshard_after_forward=raf) for b in m.blocks]
               and fsdp.fully_shard(m, reshard_after_forward=raf), lm_loss, lm_batch),
}  # fmt: skip


def _eigenvalues_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with rank_group(rank, world_size, init_file):
        results = {}
        for dtype in (torch.float64, torch.float32):
            model = shard(make_model(dtype))
            batch = local_batch(rank, dtype)
            before = [p.to_local().clone() for p in model.parameters()]
            result = hessian_eigenvalues(model, loss_fn, batch, tol=1e-4, max_iter=40)
            with HessianOperator(model, loss_fn, batch) as operator:
                method, product_error = operator.method, operator.product_error
                # A full-length run per probe: the quadrature nodes are eigenvalues of the whole Hessian.
                density = slq_density(operator.matvec, operator.dim, num_probes=2, num_iter=operator.dim,
                                      dtype=dtype, shard=operator.shard)  # fmt: skip
            untouched = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
            results[str(dtype)] = {
                "top": result.lambda_max, "bottom": result.lambda_min, "converged": result.converged,
                "top_bound": float(result.error_bounds["top"][0]), "bottom_bound": float(result.error_bounds["bottom"][0]),
                "num_hvps": result.num_hvps, "loss": result.loss, "grad_norm": result.grad_norm,
                "method": method, "product_error": product_error, "untouched": untouched,
                "vector_size": result.top_vectors.shape[-1],
                "density": (density.nodes, density.weights),
            }  # fmt: skip
        with pytest.raises(ValueError, match="`method`='double_backward' cannot run on FSDP2-sharded"):
            HessianOperator(model, loss_fn, batch, method="double_backward")
        # bfloat16 compute: gradients carry its rounding, finite differences of them are no curvature.
        bf16 = make_model(torch.float32)
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in bf16:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer, mp_policy=policy)
        fsdp.fully_shard(bf16, mp_policy=policy)
        with pytest.raises(HessdiagError, match=r"param_dtype=torch.bfloat16.*param_dtype=None"):
            hessian_eigenvalues(bf16, loss_fn, local_batch(rank, torch.float32))
        # Gradient statistics: per-rank shard norms, summed over ranks on read.
        stats = GradientStats(model.named_parameters())
        loss_fn(model, batch).backward()
        stats.observe(step=1)
        whole = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
        results["grad_norm"] = (stats.read().grad_norms[0], float(torch.linalg.vector_norm(whole)))
        torch.save(results, f"{out_dir}/rank{rank}.pt")


def _root_recipes_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Each recipe with reshard_after_forward True and False, after a training backward left `.grad`:
    the eigenvalues, and whether parameters, `.grad`, the RNG and the next training gradient are
    as without the check."""
    with rank_group(rank, world_size, init_file):
        results = {}
        for name, (build, apply_sharding, loss, batch_of) in RECIPES.items():
            for reshard_after_forward in (True, False):
                model = build()
                apply_sharding(model, reshard_after_forward)
                batch = batch_of(rank)
                loss(model, batch).backward()  # the training step's gradient, left in .grad
                params = [p.to_local().clone() for p in model.parameters()]
                grads = [p.grad.to_local().clone() for p in model.parameters()]
                rng = torch.get_rng_state()
                result = hessian_eigenvalues(model, loss, batch, tol=1e-6, max_iter=60)
                untouched = (
                    all(torch.equal(a, p.to_local()) for a, p in zip(params, model.parameters()))
                    and all(torch.equal(a, p.grad.to_local()) for a, p in zip(grads, model.parameters()))
                    and torch.equal(rng, torch.get_rng_state())
                )
                model.zero_grad(set_to_none=True)
                loss(model, batch).backward()  # training goes on: the same gradient as before the check
                trains = all(torch.equal(a, p.grad.to_local()) for a, p in zip(grads, model.parameters()))
                results[name, reshard_after_forward] = {
                    "top": result.lambda_max, "bottom": result.lambda_min, "converged": result.converged,
                    "top_bound": float(result.error_bounds["top"][0]),
                    "bottom_bound": float(result.error_bounds["bottom"][0]), "untouched": untouched, "trains": trains,
                }  # fmt: skip
        torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_usual_fsdp2_recipes_with_parameters_in_the_root_group_match_the_dense_hessian(tmp_path):
    """One `fully_shard(model)`; blocks sharded with embeddings, norm and head in the root's group.
    Refused before ("two gradients ... differ by 1 of their size"): the `.grad` swap missed the
    sharded parameters that the root's reduce-scatter accumulates into."""
    first, second = _spawn(_root_recipes_worker, tmp_path)
    assert first == second  # every rank decides alike
    for name, (build, _, loss, batch_of) in RECIPES.items():
        model = build()
        hessian = dense_hessian(model, lambda m, shards: sum(loss(m, b) for b in shards) / 2, [batch_of(0), batch_of(1)])
        eigenvalues = torch.linalg.eigvalsh(hessian)
        for reshard_after_forward in (True, False):
            got = first[name, reshard_after_forward]
            assert got["converged"] and got["untouched"] and got["trains"], (name, reshard_after_forward)
            assert abs(got["top"] - float(eigenvalues[-1])) <= got["top_bound"]
            assert abs(got["bottom"] - float(eigenvalues[0])) <= got["bottom_bound"]
            assert got["top"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6)


def _spawn(worker, tmp_path) -> list[dict]:
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _mean_of_rank_losses(m, shards):
    return sum(loss_fn(m, b) for b in shards) / len(shards)


def test_hessian_eigenvalues_of_fsdp2_model_match_the_dense_hessian_within_their_bounds(tmp_path):
    ranks = _spawn(_eigenvalues_worker, tmp_path)
    model = make_model(torch.float64)
    shards = [local_batch(r, torch.float64) for r in range(2)]
    hessian = dense_hessian(model, _mean_of_rank_losses, shards)
    torch.testing.assert_close(hessian, hessian.T)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    true_max, true_min = float(eigenvalues[-1]), float(eigenvalues[0])
    gradient = torch.autograd.grad(_mean_of_rank_losses(model, shards), list(model.parameters()))
    true_grad_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gradient])))
    assert true_min < -1e-3 * true_max  # both ends are tested, a negative one included
    for dtype, rel in (("torch.float64", 1e-6), ("torch.float32", 1e-3)):
        first, second = ranks[0][dtype], ranks[1][dtype]
        for key in ("top", "bottom", "converged", "num_hvps", "loss", "method", "product_error", "top_bound"):
            assert first[key] == second[key], (dtype, key)  # every rank decides alike
        assert first["method"] == "finite_difference"
        assert first["converged"]
        # The claimed bound holds (plus the interlacing side: a Ritz value never exceeds lambda_max).
        assert abs(first["top"] - true_max) <= first["top_bound"], dtype
        assert abs(first["bottom"] - true_min) <= first["bottom_bound"], dtype
        assert first["top"] == pytest.approx(true_max, rel=rel)
        assert first["loss"] == pytest.approx(float(_mean_of_rank_losses(model, shards).detach()), rel=rel)
        assert first["grad_norm"] == pytest.approx(true_grad_norm, rel=rel)
        assert first["untouched"] and second["untouched"]  # parameters restored bit-for-bit
        assert {first["vector_size"], second["vector_size"]} != {model_dim(model)}  # Ritz vectors are local pieces
        assert first["vector_size"] + second["vector_size"] == model_dim(model)
        nodes, weights = first["density"]
        torch.testing.assert_close(nodes, second["density"][0], rtol=0, atol=0)  # the same density on every rank
        seen = nodes[weights > 1e-8]
        distance = (seen[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
        assert float(distance.max()) <= rel * float(eigenvalues.abs().max()), dtype
    for rank in ranks:
        observed, whole = rank["grad_norm"]
        assert observed == pytest.approx(whole, rel=1e-6)


def _micro_batches_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with rank_group(rank, world_size, init_file):
        model = shard(make_model(torch.float64))
        result = hessian_eigenvalues(model, loss_fn, local_micro_batches(rank), tol=1e-6, max_iter=60, which="top")
        torch.save({"top": result.lambda_max, "bound": float(result.error_bounds["top"][0]), "loss": result.loss,
                    "grad_norm": result.grad_norm}, f"{out_dir}/rank{rank}.pt")  # fmt: skip


def local_micro_batches(rank: int) -> MicroBatches:
    """This rank's batch in two unequal micro-batches."""
    x, y = local_batch(rank, torch.float64)
    return MicroBatches([(x[:2], y[:2]), (x[2:], y[2:])])


def _mean_of_rank_step_losses(m, ranks):
    return sum(sum(loss_fn(m, micro) for micro in batches) / len(batches) for batches in ranks) / len(ranks)


def test_fsdp2_model_on_micro_batches_is_the_hessian_of_the_ranks_step_losses(tmp_path):
    """Each rank's micro-batches one at a time through FSDP2's backward: the mean over ranks of each
    rank's mean micro-batch loss."""
    ranks = _spawn(_micro_batches_worker, tmp_path)
    model = make_model(torch.float64)
    micro = [local_micro_batches(r) for r in range(2)]
    hessian = dense_hessian(model, _mean_of_rank_step_losses, micro)
    true_max = float(torch.linalg.eigvalsh(hessian)[-1])
    gradient = torch.autograd.grad(_mean_of_rank_step_losses(model, micro), list(model.parameters()))
    for rank in ranks:
        assert abs(rank["top"] - true_max) <= rank["bound"] + 1e-9 * abs(true_max)
        assert rank["top"] == pytest.approx(true_max, rel=1e-5)
        assert rank["loss"] == pytest.approx(float(_mean_of_rank_step_losses(model, micro).detach()), rel=1e-12)
        assert rank["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gradient]))), rel=1e-10)


def model_dim(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train(rank: int, monitor_dir: str | None, steps: int = 8):
    """A plain FSDP2 loop on this rank's batches; with a Monitor when `monitor_dir` is given. One
    `fully_shard(model)`: every parameter in the root's group."""
    model = fsdp.fully_shard(make_model(torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = None
    if monitor_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(monitor_dir) if rank == 0 else None  # rank 0 logs, as under DDP
        monitor = Monitor(model, loss_fn, optimizer=optimizer, writer=writer, check_every=3, log_every=2, strict=True,
                          density_every=2)  # fmt: skip
    torch.manual_seed(100 + rank)
    for _ in range(steps):
        batch = local_batch(rank, torch.float32)
        batch = (batch[0] + 0.1 * torch.randn_like(batch[0]), batch[1])
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        if monitor is not None:
            monitor.after_backward()
        optimizer.step()
        if monitor is not None:
            monitor.after_step(batch, loss)
    if monitor is not None:
        monitor.flush()
    state = [p.to_local().clone() for p in model.parameters()]
    return state, monitor, torch.rand(1)


def _monitor_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with rank_group(rank, world_size, init_file):
        plain, _, plain_rng = _train(rank, None)
        observed, monitor, observed_rng = _train(rank, f"{out_dir}/logs")
        checks = [(c.step, c.lambda_max, c.hvp_method, c.product_error) for c in monitor.checks]
        torch.save(
            {"identical": all(torch.equal(a, b) for a, b in zip(plain, observed)) and torch.equal(plain_rng, observed_rng),
             "checks": checks, "failed": monitor.failed_checks, "events": [e.name for e in monitor.events]},  # fmt: skip
            f"{out_dir}/rank{rank}.pt",
        )


def test_monitor_on_fsdp2_plain_loop_observes_without_changing_training(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, second = _spawn(_monitor_worker, tmp_path)
    for rank in (first, second):
        assert rank["identical"]  # parameters and RNG bit-for-bit as without the monitor, on each rank
        assert rank["failed"] == []
        assert [step for step, *_ in rank["checks"]] == [3, 6]
    assert first["checks"] == second["checks"] and first["events"] == second["events"]  # ranks agree
    assert all(method == "finite_difference" and error > 0 for *_, method, error in first["checks"])
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("hessdiag/spectral_density")] == [6]  # the second check's
    lambda_max = [event.value for event in events.Scalars("hessdiag/lambda_max")]
    assert lambda_max == pytest.approx([c[1] for c in first["checks"]])
    assert [event.value for event in events.Scalars("hessdiag/product_error")] == pytest.approx(
        [c[3] for c in first["checks"]]
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["logs"]  # one writer: rank 0's


@pytest.mark.parametrize("call", ["self", "submodule"])
def test_lightning_callback_under_model_parallel_strategy_with_fully_shard(tmp_path, call):
    """ModelParallelStrategy + `fully_shard` in `configure_model` on two CPU processes: embeddings,
    norm and head in the root's group, the training step through ``self(...)``; or the root owning
    nothing and the step calling a submodule, bypassing it (refused before). Lightning's launcher
    re-runs the script for rank 1, so the fit runs in a subprocess (see the script)."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = os.path.join(os.path.dirname(__file__), "fsdp_lightning_run.py")
    run = subprocess.run([sys.executable, script, str(tmp_path), call], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["hessdiag/lambda_max"]] == [3, 6]
    assert all(value > 0 for _, value in scalars["hessdiag/lambda_max"])
    assert [value for _, value in scalars["hessdiag/check_failed"]] == [0.0, 0.0]
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("hessdiag/hvp_method/text_summary")]
    assert len(texts) == 1 and texts[0].startswith("finite_difference (the model is FSDP2-sharded")  # once: it never changed
    assert all(value > 0 for _, value in scalars["hessdiag/product_error"])
