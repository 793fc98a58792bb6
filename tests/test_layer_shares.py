"""Where the curvature lives: module shares of a direction, against dense eigenvectors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import hessian_eigenvalues, layer_shares
from hessdiag.estimators.layer_shares import module_label
from oracles import dense_hessian
from spawned import rank_group


class TwoBlocks(nn.Module):
    """Two independent linear regressions, losses added: the Hessian is block-diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.steep = nn.Linear(3, 1)
        self.flat = nn.Linear(3, 1)

    def forward(self, x):
        # Inputs scaled by 10 on the steep block: its curvature is 100x the other's.
        return self.steep(10 * x).squeeze(1), self.flat(x).squeeze(1)


def two_block_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    return x, y


def two_block_loss(model, batch):
    x, y = batch
    steep, flat = model(x)
    return F.mse_loss(steep, y[:, 0]) + F.mse_loss(flat, y[:, 1])


def top_eigenvector(hessian: torch.Tensor) -> torch.Tensor:
    torch.testing.assert_close(hessian, hessian.T)
    values, vectors = torch.linalg.eigh(hessian)
    assert values[-1] - values[-2] > 1e-3 * values[-1].abs()  # a distinct top: the eigenvector is defined
    return vectors[:, -1]


def by_hand(model: nn.Module, vector: torch.Tensor, owners: dict[str, str]) -> dict[str, float]:
    """Shares from slicing the flat vector by ``model.named_parameters()`` (tied tensors once)."""
    shares: dict[str, float] = {}
    offset = 0
    for name, p in model.named_parameters():
        piece = vector[offset : offset + p.numel()]
        offset += p.numel()
        owner = owners.get(name, name.rpartition(".")[0] or name)  # a root parameter owns itself
        shares[owner] = shares.get(owner, 0.0) + float(piece.square().sum())
    assert offset == vector.numel()
    total = sum(shares.values())
    return {name: value / total for name, value in shares.items()}


def test_block_diagonal_top_direction_lies_in_the_steep_module():
    torch.manual_seed(0)
    model = TwoBlocks().double()
    batch = two_block_batch()
    dense = top_eigenvector(dense_hessian(model, two_block_loss, batch))
    shares = layer_shares(model, dense)
    assert list(shares) == ["steep", "flat"]
    assert shares["steep"] == pytest.approx(1.0, abs=1e-12)
    assert shares["flat"] == pytest.approx(0.0, abs=1e-12)
    # The Ritz vector the check really holds: the same, within its accuracy.
    result = hessian_eigenvalues(model, two_block_loss, batch, which="top", tol=1e-10, hvp_method="double_backward")
    ritz = layer_shares(model, result.top_vectors[0])
    assert ritz["steep"] == pytest.approx(1.0, abs=1e-8)
    assert ritz["flat"] == pytest.approx(0.0, abs=1e-8)
    # The bottom direction lies in the flat module.
    bottom = layer_shares(model, result.bottom_vectors[0])
    assert list(bottom)[0] == "flat"


class Mixed(nn.Module):
    """Modules that share the top direction, a LayerNorm, and a parameter on the root itself."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.encoder(self.scale * x))


def mixed_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def mixed_problem():
    torch.manual_seed(1)
    model = Mixed().double()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    return model, (x, y)


def test_mixed_shares_match_the_dense_eigenvector():
    model, batch = mixed_problem()
    dense = top_eigenvector(dense_hessian(model, mixed_loss, batch))
    shares = layer_shares(model, dense)
    expected = by_hand(model, dense, {})
    assert set(shares) == {"scale", "encoder.0", "encoder.1", "head"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    for name, value in expected.items():
        assert shares[name] == pytest.approx(value, abs=1e-12)
    assert list(shares.values()) == sorted(shares.values(), reverse=True)  # most first
    assert sum(value > 0.05 for value in shares.values()) >= 2  # a mixed case indeed
    assert module_label("") == "(root)" and module_label("head") == "head"
    # The Ritz vector of a converged check gives the same shares (its sign is irrelevant).
    result = hessian_eigenvalues(model, mixed_loss, batch, which="top", tol=1e-9, max_iter=80)
    ritz = layer_shares(model, result.top_vectors[0])
    for name, value in expected.items():
        assert ritz[name] == pytest.approx(value, abs=1e-5)


def test_shares_over_chosen_parameters_only():
    model, batch = mixed_problem()
    chosen = list(model.head.parameters()) + [model.scale]
    vector = torch.arange(1.0, 1.0 + sum(p.numel() for p in chosen), dtype=torch.float64)
    shares = layer_shares(model, vector, params=chosen)
    assert set(shares) == {"head", "scale"}
    head = float(vector[:-1].square().sum())
    assert shares["head"] == pytest.approx(head / float(vector.square().sum()), rel=1e-12)


class Tied(nn.Module):
    """A language-model head tied to the embedding: one tensor registered on two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def tied_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_tied_weight_is_counted_once_under_its_first_owner():
    torch.manual_seed(3)
    model = Tied().double()
    generator = torch.Generator().manual_seed(4)
    batch = (torch.randint(0, 6, (12,), generator=generator), torch.randint(0, 6, (12,), generator=generator))
    dim = sum(p.numel() for p in model.parameters())
    assert dim == 6 * 4 + 4 * 4 + 4 + 6  # the tied tensor once
    dense = top_eigenvector(dense_hessian(model, tied_loss, batch))
    shares = layer_shares(model, dense)
    assert set(shares) == {"embed", "mix", "head"}  # head keeps its own bias
    expected = by_hand(model, dense, {})
    for name, value in expected.items():
        assert shares[name] == pytest.approx(value, abs=1e-12)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    # The tied tensor's whole share is the embedding's: the head holds its bias alone.
    assert shares["head"] == pytest.approx(float(dense[-6:].square().sum()), abs=1e-12)


def test_bad_vectors_are_refused_naming_the_argument():
    model, _ = mixed_problem()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"`vector` must be a flat tensor of shape \(54,\)"):
        layer_shares(model, torch.ones(dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="`vector` must be a flat tensor"):
        layer_shares(model, torch.ones(1, dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="`vector` must be non-zero and finite"):
        layer_shares(model, torch.zeros(dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="`vector` must be non-zero and finite"):
        layer_shares(model, torch.full((dim,), float("nan"), dtype=torch.float64))


class RootOwned(nn.Module):
    """The usual FSDP2 recipe: inner layers sharded, a parameter left to the root's group."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))
        self.encoder = nn.Linear(4, 5)  # 5 rows: uneven shards over two ranks
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x))) + self.offset


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    with rank_group(rank, world_size, init_file):
        torch.manual_seed(0)
        model = RootOwned().double()
        dim = sum(p.numel() for p in model.parameters())
        vector = torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ddp = nn.parallel.DistributedDataParallel(RootOwned().double())
        fully_shard(model.encoder)
        fully_shard(model.head)
        fully_shard(model)
        pieces, offset = [], 0
        for p in model.parameters():
            full = vector[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            pieces.append(distribute_tensor(full, p.device_mesh, p.placements).to_local().reshape(-1))
        local = torch.cat(pieces)
        torch.save(
            {"fsdp": layer_shares(model, local), "ddp": layer_shares(ddp, vector), "local_size": local.numel(), "vector": vector},
            f"{out_dir}/rank{rank}.pt",
        )


def test_shares_on_two_processes_fsdp2_local_pieces_all_reduced_and_ddp(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = RootOwned().double()
    expected = layer_shares(model, ranks[0]["vector"])
    assert set(expected) == {"offset", "encoder", "head"}
    assert ranks[0]["local_size"] != ranks[1]["local_size"]  # really local pieces, uneven
    assert ranks[0]["local_size"] + ranks[1]["local_size"] == ranks[0]["vector"].numel()
    for rank in ranks:
        for kind in ("fsdp", "ddp"):
            assert list(rank[kind]) == list(expected), kind
            for name, value in expected.items():
                assert rank[kind][name] == pytest.approx(value, rel=1e-12), (kind, name)


def test_a_root_parameter_is_named_as_in_the_per_layer_statistics():
    """Two parameters on the root (a position embedding, a class token) are two owners, named as the
    per-layer gradient statistics name them, so a share and a chart point at the same thing."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.ones(3))
            self.cls_token = nn.Parameter(torch.ones(2))
            self.head = nn.Linear(5, 1)

    from hessdiag.steps.gradients import GradientStats

    model = Tokens()
    shares = layer_shares(model, torch.ones(sum(p.numel() for p in model.parameters())))
    assert list(shares) == ["head", "pos_embed", "cls_token"]
    assert set(shares) == set(GradientStats(model.named_parameters()).modules)
