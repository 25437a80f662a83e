"""Fast unit tests of the plain-PyTorch layer: losses, router, masking, expert freezing, head."""
import threading

import numpy as np
import pytest
import torch

from models import losses
from models.adapter import MMEncoder, MoEAdapter
from models.methods import create_model
from models.losses import LossWeights
from models.methods.cmoe import CMoE
from models.heads import CosineClassifier

DIMS = {"a": 5, "b": 3}


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}
    return feats, torch.ones(n, len(DIMS), dtype=torch.bool), torch.arange(n) % 3


def test_relation_loss_is_zero_when_representations_agree_and_positive_otherwise():
    x = torch.randn(6, 4)
    assert losses.relation(x, x.clone()) == 0
    assert losses.relation(x, torch.randn(6, 4)) > 0


def test_alignment_loss_drops_when_paired_embeddings_coincide():
    torch.manual_seed(0)
    za = torch.randn(16, 8)
    present = torch.ones(16, 2, dtype=torch.bool)
    paired = losses.alignment(torch.stack([za, za], 1), present, temperature=0.1)
    unpaired = losses.alignment(torch.stack([za, torch.randn(16, 8)], 1), present, temperature=0.1)
    assert paired < 0.1 < unpaired


def test_alignment_ignores_samples_missing_a_modality():
    z = torch.randn(4, 2, 8)
    present = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    changed = z.clone()
    changed[2:, 1] = torch.randn(2, 8)
    assert torch.equal(losses.alignment(z, present), losses.alignment(changed, present))


def test_distillation_is_zero_for_identical_logits_on_old_classes():
    old = torch.randn(5, 3)
    new = torch.cat([old, torch.randn(5, 2)], 1)  # new classes appended are ignored
    assert losses.distillation(new, old).abs() < 1e-6
    assert losses.distillation(torch.randn(5, 5), old) > 0


def test_router_picks_exactly_top_k_with_normalised_gates():
    moe = MoEAdapter(dim=8, num_experts=4, top_k=2, bottleneck=4).eval()
    gates, probs = moe.route(torch.randn(10, 8))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(10))
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(-1, probs.topk(2).indices, True))


def test_load_balancing_penalises_a_collapsed_router():
    moe = MoEAdapter(dim=8, num_experts=4, top_k=1, bottleneck=4).eval()
    torch.nn.init.zeros_(moe.router.weight)
    torch.nn.init.zeros_(moe.router.bias)
    moe(torch.randn(32, 8))
    uniform = moe.balance_loss.item()
    moe.router.bias.data = torch.tensor([10.0, 0, 0, 0])
    moe(torch.randn(32, 8))
    assert uniform == pytest.approx(1.0)
    assert moe.balance_loss.item() > 3.5  # approaches num_experts when one expert takes everything


def test_missing_modality_is_masked_out():
    enc = MMEncoder(DIMS, dim=16, blocks=2, heads=2, num_experts=3, top_k=2, bottleneck=4, dropout=0).eval()
    feats, present, _ = batch()
    present[:, 1] = False
    z_m, z = enc(feats, present)
    feats["b"] = feats["b"] + 100
    z_m2, z2 = enc(feats, present)
    assert torch.allclose(z, z2, atol=1e-6) and torch.allclose(z_m[:, 0], z_m2[:, 0], atol=1e-6)


def test_frozen_experts_do_not_change_while_the_rest_trains():
    torch.manual_seed(0)
    model = CMoE(DIMS, num_classes=3, dim=16, heads=2, num_experts=3, top_k=3, bottleneck=4)
    moe = model.encoder.moe_layers[0]
    moe.frozen[0] = True
    frozen_before = [p.clone() for p in moe.experts[0].parameters()]
    free_before = [p.clone() for p in moe.experts[1].parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        feats, present, y = batch(seed=step)
        loss, _ = model.objective(feats, present, y, LossWeights())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, moe.experts[0].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(free_before, moe.experts[1].parameters()))


def test_expert_lifecycle_freezes_the_most_used_unfrozen_experts():
    model = CMoE(DIMS, num_classes=2, dim=16, heads=2, num_experts=4, top_k=2, bottleneck=4, blocks=1)
    moe = model.encoder.moe_layers[0]
    moe.frozen[3] = True
    model.freeze_most_used_experts([torch.tensor([1.0, 5.0, 2.0, 9.0])], how_many=2)
    assert moe.frozen.tolist() == [False, True, True, True]


def test_objective_adds_distillation_and_relation_with_a_previous_model():
    torch.manual_seed(0)
    model = CMoE(DIMS, num_classes=3, dim=16, heads=2, num_experts=3, top_k=2, bottleneck=4)
    old = CMoE(DIMS, num_classes=2, dim=16, heads=2, num_experts=3, top_k=2, bottleneck=4).eval()
    feats, present, y = batch()
    _, terms = model.objective(feats, present, y, LossWeights(), old_model=old, seen_before=2)
    assert set(terms) == {"ce", "kd", "rel", "align", "bal"}
    _, first = model.objective(feats, present, y, LossWeights(align=0, bal=0))
    assert set(first) == {"ce"}


def test_alignment_reads_the_real_rows_not_those_drawn_from_class_gaussians():
    """A drawn row's modalities share its class's Gaussian, not one sample: nothing to align."""
    torch.manual_seed(0)
    model = CMoE(DIMS, dim=16, heads=2, num_experts=3, top_k=2, bottleneck=4, projection=32, class_gaussians=4)
    _fitted(model, [(3, batch(n=12))])
    model.begin_task(4)
    model.eval()
    feats, present, _ = batch(n=6, seed=1)
    _, terms = model.objective(feats, present, torch.full((6,), 3), LossWeights(bal=0))
    expected = losses.alignment(model.forward_features(feats, present)[0], present, LossWeights.align_temperature)
    assert len(model.gaussians) == 3 and torch.isclose(torch.tensor(terms["align"]), expected)


def test_cosine_head_grows_and_keeps_old_rows():
    head = CosineClassifier(8, 2)
    old = head.weight.detach().clone()
    head.grow(3)
    assert head.num_classes == 5 and torch.equal(head.weight[:2], old)
    assert head(torch.randn(4, 8)).shape == (4, 5)


def test_every_trainable_expert_gets_a_gradient_even_when_no_token_chose_it():
    """Data-parallel workers must reduce the same parameters, whatever their batch routed."""
    moe = MoEAdapter(dim=8, num_experts=4, top_k=1, bottleneck=4).train()
    moe.noise = 0
    moe.router.bias.data = torch.tensor([10.0, 0, 0, 0])  # every token goes to expert 0
    moe(torch.randn(5, 8)).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


def _fitted(model, parts):
    for head_size, (feats, present, targets) in parts:
        model.begin_task(head_size)
        model.accumulate(feats, present, targets)
        model.end_task(lambda t: t)
    return model


def test_ridge_head_learned_task_by_task_equals_the_joint_fit():
    """RanPAC's head from accumulated statistics is exactly the head fitted on all data at once."""
    from models.methods.analytic import RidgeHead
    torch.manual_seed(0)
    feats, present, _ = batch(n=40, seed=3)
    targets = torch.arange(40) % 4
    feats = {m: x + 3 * targets[:, None].float() for m, x in feats.items()}
    order = targets.argsort(stable=True)
    first, second = order[:20], order[20:]  # classes 0-1, then 2-3
    torch.manual_seed(1)
    sequential = _fitted(RidgeHead(DIMS, projection=64), [
        (2, ({m: x[first] for m, x in feats.items()}, present[first], targets[first])),
        (4, ({m: x[second] for m, x in feats.items()}, present[second], targets[second]))])
    torch.manual_seed(1)
    joint = _fitted(RidgeHead(DIMS, projection=64), [(4, (feats, present, targets))])
    assert torch.allclose(sequential.ridge.weight, joint.ridge.weight, atol=1e-8)
    assert (sequential(feats, present)["logits"].argmax(-1) == targets).float().mean() > 0.8  # chance 0.25


def test_prototype_head_keeps_old_prototypes_when_new_classes_arrive():
    from models.methods.analytic import PrototypeHead
    feats, present, _ = batch(n=12, seed=4)
    targets = torch.arange(12) % 2
    model = _fitted(PrototypeHead(DIMS), [(2, (feats, present, targets))])
    before = model.sums.clone()
    _fitted(model, [(3, (feats, present, torch.full((12,), 2)))])
    assert torch.equal(model.sums[:2], before) and model.counts.tolist() == [6, 6, 12]


def test_experts_added_for_a_new_task_train_and_a_checkpoint_rebuilds_them():
    model = CMoE(DIMS, num_experts=2, top_k=1, experts_per_task=2, freeze_per_task=2, head="cosine")
    feats, present, targets = batch(n=16)
    model.begin_task(3)
    model.train()
    model.objective(feats, present, targets, LossWeights())  # routes: some routing mass
    model.end_task(lambda t: t)
    model.begin_task(4)
    moe = model.encoder.moe_layers[0]
    assert moe.num_experts == 4 and moe.router.out_features == 4 and moe.frozen.tolist()[2:] == [False, False]
    params = model.trainable_parameters()
    assert all(not p.requires_grad for e, f in zip(moe.experts, moe.frozen) if f for p in e.parameters())
    assert any(p is moe.experts[3].down.weight for p in params)
    CMoE(DIMS, head="cosine", **model.shape_args()).load_state_dict(model.state_dict())  # grown shapes rebuild


def test_a_modality_missing_from_the_first_task_is_standardised_when_it_first_appears():
    from pipeline.data import batch_to_arrays
    from pipeline.worker import fit_standardizer
    model = create_model("ridge", {"a": 2, "b": 3}, 0, {})
    rng = np.random.default_rng(0)

    def task(b_present: bool):
        b = [list(v) for v in rng.normal(5.0, 2.0, (8, 3))] if b_present else [None] * 8
        feats, present, labels = batch_to_arrays({"label": np.zeros(8, dtype=np.int64), "a": rng.normal(0, 1, (8, 2)),
                                                  "b": b}, {"a": 2, "b": 3})
        return [({m: torch.from_numpy(x) for m, x in feats.items()}, torch.from_numpy(present), torch.from_numpy(labels))]

    fit_standardizer(model, task(False), {"a": 2, "b": 3})
    assert model.standardizer.fitted.tolist() == [True, False]
    assert torch.equal(model.standardizer.b_std, torch.ones(3))  # not scaled by the 0 variance of no rows
    a_mean = model.standardizer.a_mean.clone()
    fit_standardizer(model, task(True), {"a": 2, "b": 3})
    assert model.standardizer.fitted.tolist() == [True, True]
    assert torch.equal(model.standardizer.a_mean, a_mean)  # fitted once
    assert 3 < float(model.standardizer.b_mean.mean()) < 7 and float(model.standardizer.b_std[0]) > 1


def all_reduce_between(n: int):
    """`n` reduce functions for `n` threads standing in for data-parallel workers: each call waits
    for the others' and returns the sum, as torch.distributed.all_reduce does; a worker that
    reduces something else, or a different number of times, fails or hangs."""
    barrier, slots = threading.Barrier(n, timeout=10), [None] * n

    def reduce_for(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        return reduce
    return [reduce_for(r) for r in range(n)]


def test_class_gaussians_from_two_workers_sums_match_the_rows_mean_and_covariance():
    """Rank-3 rows (tokens in one modality, a vector in the other) split over data-parallel workers:
    one never sees class 1, one sees no rows at all. Every worker ends with the same entries, which
    hold the pooled rows' mean and exact covariance, and draws from them have it too."""
    from models.methods.gaussians import ClassGaussians
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    rows = {c: randn(1, 12) + randn(300, 3) @ randn(3, 12) for c in (0, 1)}
    as_batch = lambda x: {"a": x[:, :4].float(), "b": x[:, 4:].reshape(len(x), 2, 4).float()}  # noqa: E731
    workers = [ClassGaussians(rank=4, num_modalities=2) for _ in range(3)]
    for w in workers:
        w.begin_task()
    for c, x in rows.items():
        parts = [x[:150], x[150:]] if c == 0 else [x[:0], x]
        for w, part in zip(workers, parts):
            if len(part):
                w.accumulate(as_batch(part), torch.ones(len(part), 2, dtype=torch.bool), torch.full((len(part),), c))
    threads = [threading.Thread(target=w.end_task, args=(reduce,), kwargs={"head_size": 2}) for w, reduce
               in zip(workers, all_reduce_between(3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(torch.equal(workers[0].factors, w.factors) for w in workers[1:])
    gaussians = workers[0]
    assert gaussians.labels.tolist() == [0, 1] and gaussians.counts.tolist() == [300, 300]
    assert gaussians.shapes.tolist() == [[0, 4], [2, 4]]
    for e, (c, x) in enumerate(rows.items()):
        f = gaussians.factors[e].double()
        assert torch.allclose(gaussians.means[e].double(), x.mean(0), atol=1e-5)
        assert torch.allclose(f.T @ f, torch.cov(x.T, correction=0), atol=1e-4)
        assert gaussians.rest[e].max() < 1e-2  # rank 3 < 4: nothing left over
    features, present, labels = gaussians.sample(torch.ones(20000, dtype=torch.long), ["a", "b"], g)
    assert features["b"].shape == (20000, 2, 4) and bool(present.all()) and bool((labels == 1).all())
    drawn = torch.cat([features["a"], features["b"].reshape(20000, -1)], 1).double()
    assert torch.allclose(drawn.mean(0), rows[1].mean(0), atol=0.1)
    assert torch.allclose(torch.cov(drawn.T), torch.cov(rows[1].T), rtol=0.1, atol=0.1)
    reloaded = ClassGaussians(rank=4, num_modalities=2)
    reloaded.load_state_dict(gaussians.state_dict())
    assert torch.equal(reloaded.factors, gaussians.factors)
