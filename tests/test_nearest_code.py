"""The nearest-code score (`score_method=knn`), one block shared by every architecture:
fitted on the distinct training normals, exported inside the ONNX graph, and numerically
stable, so ONNX Runtime picks the same distance as PyTorch even on adversarial near-ties
and on codes far from the origin (where the matrix-product expansion of the squared
distance cancels catastrophically)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gansentry.contract import INPUT_NAME, SCORE_NAME
from gansentry.manifest import TabularInput
from training.models import ARCHITECTURES, build_model, default_hparams
from training.models.blocks import MlpEncoder, NearestCode
from training.models.registry import offers_score
from training.onnx_export import ParityError, export_onnx

TABULAR = TabularInput(num_features=13, feature_names=[f"f{i}" for i in range(13)])


# Every registered architecture that offers the nearest-code score.
KNN_ARCHITECTURES = [a for a in ARCHITECTURES if offers_score(a, TABULAR, "knn")]


def knn_model(arch: str, **extra):
    torch.manual_seed(0)
    h = {"latent_dim": 8, "score_method": "knn", "knn_max_reference": 20, **extra}
    if "memory_units" in default_hparams(arch, TABULAR):
        h["memory_units"] = 10
    if not any(isinstance(m, MlpEncoder) for m in build_model(arch, TABULAR, **h).modules()):
        # No encoder: codes are D's last hidden features, 8 wide like everyone's codes.
        h["d_hidden"] = [16, 8]
    model = build_model(arch, TABULAR, **h)
    for _ in range(2):
        model.training_step(torch.rand(8, 13, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 13, generator=torch.Generator().manual_seed(seed))


def graph_scores(
    model, x: torch.Tensor, path, relative_check: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime's scores from the exported graph, PyTorch's) for the same inputs.
    Without `relative_check`, export's relative parity check may fail (the graph is written
    before it runs): float32 codes far from the origin carry more error than 1e-4 of a small
    distance, and the caller checks the scores against exact distances itself."""
    try:
        export_onnx(model.scorer(), x[:4], path)
    except ParityError:
        if relative_check:
            raise
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run([SCORE_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        return served, model.score(x)[0].numpy()


@pytest.mark.parametrize("arch", KNN_ARCHITECTURES)
def test_knn_score_is_the_distance_to_the_nearest_training_code(arch, tmp_path):
    model = knn_model(arch)
    assert model.score_is_fitted
    with pytest.raises(RuntimeError, match="fit_score"):
        model.score(rows(3, 2))
    distinct = rows(12, 3)
    assert model.fit_score(torch.cat([distinct, distinct, distinct[:4]]))
    # Duplicates are encoded once; every distinct row is kept under the cap. A code is
    # the latent code (8 here) or, for a model without an encoder, its features.
    width = model.code(distinct[:1]).shape[1]
    assert model.nearest.codes.shape == (12, width)
    x = rows(7, 4)
    with torch.no_grad():
        score = model.score(x)[0]
        assert float(model.score(distinct)[0].max()) < 1e-3
        expected = torch.cdist(model.code(x), model.code(distinct)).min(dim=1).values
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    # A checkpoint carries the codes: loading resizes the reference set.
    copy = build_model(arch, TABULAR, **model.hparams)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.eval().score(x)[0], score)
    # The exported graph carries them too, and training rows (distance ~0) keep parity.
    served, pt = graph_scores(model, torch.cat([x, distinct[:3]]), tmp_path / "m.onnx")
    np.testing.assert_allclose(served, pt, rtol=0, atol=1e-5)
    # Above the cap, a fixed random subset of the distinct rows.
    capped = build_model(arch, TABULAR, **{**model.hparams, "knn_max_reference": 5})
    capped.load_state_dict(model.state_dict())
    capped.fit_score(distinct)
    assert capped.nearest.codes.shape == (5, width)


def adversarial_references(z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Reference codes around each query code z_i: two at exactly the same distance r on
    opposite sides (a tie), one 1e-6 further (a near-tie), and a crowd of decoys just beyond
    them; r is far below the gaps between the queries, so z_i's nearest reference is always
    one of its own. -> (references, r)."""
    g = torch.Generator().manual_seed(5)
    zd = z.double()
    gaps = torch.cdist(zd, zd) + torch.eye(len(z), dtype=torch.float64) * 1e9
    radius = 0.03
    assert radius < 0.2 * float(gaps.min())
    refs = []
    for zi in zd:
        v, u, d = (torch.randn(n, len(zi), generator=g, dtype=torch.float64) for n in (1, 1, 20))
        v = radius * v[0] / v.norm()
        u = radius * (1 + 1e-6) * u[0] / u.norm()
        r = radius * (1.01 + 0.2 * torch.rand(20, 1, generator=g, dtype=torch.float64))
        refs += [zi + v, zi - v, zi + u, *(zi + r * d / d.norm(dim=1, keepdim=True))]
    # Shuffled, so a search that settles float32 ties by position cannot pass by luck.
    return torch.stack(refs)[torch.randperm(len(refs), generator=g)].float(), radius


def last_linear_of_code(model) -> torch.nn.Linear:
    ran: list[torch.nn.Linear] = []
    hooks = [
        m.register_forward_hook(lambda m, *_: ran.append(m))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        width = model.code(rows(2, 0)).shape[1]
    for h in hooks:
        h.remove()
    heads = [m for m in ran if m.out_features == width]
    assert heads
    return heads[-1]


@pytest.mark.parametrize("arch", KNN_ARCHITECTURES)
def test_graph_and_pytorch_agree_on_near_ties_far_from_the_origin(arch, tmp_path):
    """`far` shifts every code (an encoder whose codes sit far from the origin): the
    expansion |z|^2 - 2 z.r + |r|^2 then loses the neighbour's distance in float32 rounding,
    which a search that only ranks by it cannot survive."""
    far = 300.0
    model = knn_model(arch)
    model.fit_score(rows(30, 6))
    head = model.nearest
    # The code comes out of an encoder's last layer: every encoder's, whichever `code` uses;
    # a model without an encoder codes by its discriminator's features, the last linear
    # layer `code` runs.
    encoder_heads = [
        m.head
        for m in model.modules()
        if isinstance(m, MlpEncoder) and m.head.out_features == model.hparams["latent_dim"]
    ] or [last_linear_of_code(model)]
    with torch.no_grad():  # spread the codes apart, then move them all `far` out
        for encoder_head in encoder_heads:
            encoder_head.weight *= 100.0
            encoder_head.bias += far
    x = rows(9, 7)
    with torch.no_grad():
        z = model.code(x)
    refs, radius = adversarial_references(z)
    head.codes = refs - refs.mean(dim=0)
    head.centre = refs.mean(dim=0)
    served, pt = graph_scores(model, x, tmp_path / "m.onnx", relative_check=False)
    # The true nearest distance, in float64, is the tie's radius for every query.
    exact = torch.cdist(z.double(), refs.double()).min(dim=1).values.numpy()
    np.testing.assert_allclose(exact, radius, rtol=2e-3)
    tolerance = 2e-7 * far  # float32 codes at |z| ~ far carry ~6e-8 * far of error
    assert tolerance < 0.05 * radius
    np.testing.assert_allclose(pt, exact, rtol=0, atol=tolerance)
    np.testing.assert_allclose(served, pt, rtol=0, atol=tolerance)


def test_fewer_references_than_candidates():
    block = NearestCode(3)
    block.fit(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), lambda r: r, 10)
    assert block.codes.shape == (2, 3)
    d = block(torch.tensor([[0.9, 0.0, 0.0], [3.0, 4.0, 0.0]]))
    torch.testing.assert_close(d, torch.tensor([0.1, (4.0 + 16.0) ** 0.5]))


def test_egbad_runs_from_before_the_shared_block_still_load():
    """EGBAD runs trained before `NearestCode` stored the uncentred codes as `knn_codes`."""
    model = knn_model("egbad")
    model.fit_score(rows(12, 3))
    state = model.state_dict()
    state["knn_codes"] = state.pop("nearest.codes") + state.pop("nearest.centre")
    old = build_model("egbad", TABULAR, **model.hparams)
    old.load_state_dict(state)
    x = rows(7, 4)
    with torch.no_grad():
        torch.testing.assert_close(old.eval().score(x)[0], model.score(x)[0], atol=1e-5, rtol=0)


def _low_rank_codes(n: int, rank: int, dim: int, seed: int) -> torch.Tensor:
    """Codes whose variation lies in a `rank`-dimensional subspace of R^dim, off the origin."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, dim, generator=g)
    return torch.randn(n, rank, generator=g) @ mixing + 3.0


def test_principal_axes_keep_the_distances_of_codes_in_their_span():
    """With `components`, codes are compared in the reference codes' first principal axes:
    where every code lies in that span (here: references and queries from a 3-dimensional
    affine subspace of 12 dimensions), the distances are the full ones."""
    refs = _low_rank_codes(40, 3, 12, 0)
    t = torch.rand(9, 1, generator=torch.Generator().manual_seed(1))
    queries = refs[:9] + 0.1 * t * (refs[9:18] - refs[:9])  # in the same affine span
    block = NearestCode(12, components=3)
    block.fit(refs, lambda r: r, 100)
    assert block.codes.shape == (40, 3) and block.basis.shape == (12, 3)
    torch.testing.assert_close(block.basis.T @ block.basis, torch.eye(3), atol=1e-5, rtol=0)
    expected = torch.cdist(queries.double(), refs.double()).min(dim=1).values.float()
    torch.testing.assert_close(block(queries), expected, atol=1e-4, rtol=1e-4)


# Architectures whose knn score can compare codes in principal axes.
PROJECTING = [a for a in KNN_ARCHITECTURES if "knn_components" in default_hparams(a, TABULAR)]


@pytest.mark.parametrize("arch", PROJECTING)
def test_projected_codes_travel_in_checkpoints_and_the_exported_graph(arch, tmp_path):
    model = knn_model(arch, knn_components=3)
    model.fit_score(rows(30, 6))
    head = model.nearest
    assert head.codes.shape == (20, 3) and head.basis.shape[1] == 3  # 20: knn_model's cap
    x = rows(7, 4)
    with torch.no_grad():
        score = model.score(x)[0]
        projected = (model.code(x) - head.centre) @ head.basis
    expected = torch.cdist(projected, head.codes).min(dim=1).values
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    copy = build_model(arch, TABULAR, **model.hparams)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.eval().score(x)[0], score)
    served, pt = graph_scores(model, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(served, pt, rtol=1e-5, atol=1e-5)


def test_principal_axes_rank_by_the_directions_the_references_vary_in():
    """Off the span, only the first axes count: a query moved along the references' main
    direction is far, one moved as far across it (an axis they do not vary in) is not."""
    g = torch.Generator().manual_seed(2)
    refs = torch.zeros(50, 4)
    refs[:, 0] = torch.linspace(-10.0, 10.0, 50)  # the main axis
    refs[:, 1] = 0.01 * torch.randn(50, generator=g)
    block = NearestCode(4, components=1)
    block.fit(refs, lambda r: r, 100)
    along = torch.tensor([[25.0, 0.0, 0.0, 0.0]])
    across = torch.tensor([[0.0, 0.0, 15.0, 0.0]])
    assert float(block(along)) == pytest.approx(15.0, abs=1e-3)
    assert float(block(across)) < 0.5
    # Without components the block compares whole codes, and both are far.
    full = NearestCode(4)
    full.fit(refs, lambda r: r, 100)
    assert float(full(across)) == pytest.approx(15.0, abs=0.01)


def test_a_checkpoint_of_a_projected_reference_loads_into_a_fresh_block():
    block = NearestCode(12, components=3)
    block.fit(_low_rank_codes(40, 3, 12, 3), lambda r: r, 100)
    copy = NearestCode(12, components=3)
    copy.load_state_dict(block.state_dict())
    x = _low_rank_codes(5, 3, 12, 4)
    torch.testing.assert_close(copy(x), block(x))


def test_a_checkpoint_taken_before_fitting_resumes_with_a_projection():
    """Training checkpoints hold an unfitted reference: one saved without a projection
    loads into a block with one (the projection is fitted with the reference, later)."""
    before = NearestCode(12).state_dict()
    block = NearestCode(12, components=3)
    block.load_state_dict(before)
    assert not block.fitted
    refs = _low_rank_codes(40, 3, 12, 5)
    block.fit(refs, lambda r: r, 100)
    assert block.codes.shape == (40, 3)
    torch.testing.assert_close(block(refs[:4]), torch.zeros(4), atol=1e-3, rtol=0)
    fitted = NearestCode(12)
    fitted.fit(refs, lambda r: r, 100)
    with pytest.raises(RuntimeError, match="basis"):
        block.load_state_dict(fitted.state_dict())  # a fitted reference without its axes


def _two_modes() -> torch.Tensor:
    """A tight mode of 200 codes (spread 0.05) at the origin and a loose one of 30 (spread
    3) at (30, 0)."""
    g = torch.Generator().manual_seed(3)
    tight = 0.05 * torch.randn(200, 2, generator=g)
    loose = torch.tensor([30.0, 0.0]) + 3.0 * torch.randn(30, 2, generator=g)
    return torch.cat([tight, loose])


def test_relative_score_measures_each_mode_against_its_own_spread():
    """Beside the tight mode is anomalous and inside the loose mode is not, though the
    plain nearest distance says the opposite. The radii are each reference's mean distance
    to its k nearest others."""
    refs = _two_modes()
    beside_tight = torch.tensor([[0.8, 0.0]])
    inside_loose = refs[200:201] + torch.tensor([[0.5, 0.5]])
    plain, relative = NearestCode(2), NearestCode(2, relative=5)
    plain.fit(refs, lambda r: r, 1000)
    relative.fit(refs, lambda r: r, 1000)
    assert float(plain(beside_tight)) < float(plain(inside_loose))
    assert float(relative(beside_tight)) > 3 * float(relative(inside_loose))
    kept = relative.codes + relative.centre  # the distinct references, in its order
    d = torch.cdist(kept, kept).fill_diagonal_(float("inf"))
    expected = d.topk(5, dim=1, largest=False).values.mean(dim=1)
    torch.testing.assert_close(relative.radius, expected, rtol=1e-4, atol=1e-6)
    q = torch.cat([beside_tight, inside_loose])
    dq, iq = torch.cdist(q, kept).topk(5, dim=1, largest=False)
    torch.testing.assert_close(relative(q), (dq / expected[iq]).mean(dim=1), rtol=1e-5, atol=0)


def test_relative_score_travels_in_checkpoints_and_the_exported_graph(tmp_path):
    model = knn_model("mmocgan", knn_relative=4)
    model.fit_score(rows(30, 3))
    assert model.nearest.radius.shape == (20,)  # knn_model caps the reference at 20
    x = torch.cat([rows(7, 4), rows(30, 3)[:3]])
    copy = build_model("mmocgan", TABULAR, **model.hparams)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy.eval().score(x)[0], model.score(x)[0])
    served, pt = graph_scores(model, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(served, pt, rtol=1e-5, atol=1e-6)
    # A fitted reference without its radii (a run scored by the plain distance) does not
    # load into a relative block: it would divide by zero.
    plain = build_model("mmocgan", TABULAR, **{**model.hparams, "knn_relative": 0})
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.fit_score(rows(30, 3))
    with pytest.raises(RuntimeError, match="radius"):
        copy.load_state_dict(plain.state_dict())


def test_a_single_reference_has_a_unit_radius():
    block = NearestCode(3, relative=5)
    block.fit(torch.tensor([[1.0, 2.0, 2.0]]), lambda r: r, 10)
    torch.testing.assert_close(block.radius, torch.ones(1))
    torch.testing.assert_close(block(torch.zeros(1, 3)), torch.tensor([3.0]))
