import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mama.config import LossConfig, MetaConfig, ModelConfig
from mama.losses import LogitScale, angular_margin_nce
from mama.models import create_model
from mama.tasks.retrieval.module import RetrievalModule
from mama.tokenizer import WordTokenizer
from mama.weighting import (
    MetaWeighting,
    WeightNet,
    meta_forward_context,
    normalize_weights,
    select_virtual_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- weighting net and normalisation ------------------------------------------------------------


def test_weight_net_output_in_unit_interval():
    torch.manual_seed(0)
    wnet = WeightNet(hidden=16)
    losses = torch.cat([torch.rand(30) * 20, torch.tensor([0.0, 1e-6, 100.0])])
    weights = wnet(losses)
    assert weights.shape == (33,)
    assert ((weights > 0) & (weights < 1)).all()


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_net_accepts_any_loss_dtype(loss_dtype):
    torch.manual_seed(0)
    wnet = WeightNet(hidden=8)
    assert wnet(torch.rand(5, dtype=loss_dtype)).dtype == torch.float32
    wnet64 = WeightNet(hidden=8).double()
    weights = wnet64(torch.rand(5, dtype=loss_dtype))
    assert weights.dtype == torch.float64


def test_normalize_weights():
    weights = torch.tensor([0.2, 0.5, 0.1, 0.9])
    normalised = normalize_weights(weights)
    assert normalised.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(normalised, weights / weights.sum())
    zeros = normalize_weights(torch.zeros(5))
    torch.testing.assert_close(zeros, torch.full((5,), 0.2))
    assert torch.isfinite(zeros).all()


# --- virtual parameter selection ----------------------------------------------------------------


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.video = nn.Linear(2, 2)
        self.video_extra = nn.Linear(2, 2)  # shares a string prefix with "video", not a module prefix
        self.text = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_select_virtual_params_empty_means_all_trainable():
    names = select_virtual_params(_Named(), [])
    assert names == [
        "video.weight",
        "video.bias",
        "video_extra.weight",
        "video_extra.bias",
        "text.0.weight",
        "text.0.bias",
        "text.1.weight",
        "text.1.bias",
    ]


def test_select_virtual_params_prefixes():
    module = _Named()
    assert select_virtual_params(module, ["video"]) == ["video.weight", "video.bias"]
    assert select_virtual_params(module, ["text.1", "video_extra.bias"]) == [
        "video_extra.bias",
        "text.1.weight",
        "text.1.bias",
    ]


@pytest.mark.parametrize("prefix", ["audio", "vid", "frozen"])
def test_select_virtual_params_unmatched_prefix_raises(prefix):
    with pytest.raises(ValueError, match=rf"\['{prefix}'\] match no trainable parameter.*video"):
        select_virtual_params(_Named(), ["text", prefix])


def test_meta_weighting_rejects_bad_config():
    with pytest.raises(ValueError):
        MetaWeighting(MetaConfig(zero_init=False, optimizer="lbfgs", virtual_params=[]), _Named())
    with pytest.raises(ValueError):
        MetaWeighting(MetaConfig(zero_init=False, interval=0, virtual_params=[]), _Named())
    with pytest.raises(ValueError):
        MetaWeighting(MetaConfig(zero_init=False, virtual_params=["nothing"]), _Named())


# --- the bilevel step against a hand-written reference ------------------------------------------

MARGIN = 0.1


class TinyTask(nn.Module):
    """Linear video and text encoders with a learnable logit scale and the angular margin loss."""

    def __init__(self):
        super().__init__()
        self.video = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = LogitScale(init=math.log(10.0))

    def forward(self, batch):
        video_emb = F.normalize(self.video(batch["video"]), dim=-1)
        text_emb = F.normalize(self.text(batch["text"]), dim=-1)
        loss = angular_margin_nce(video_emb, text_emb, self.logit_scale(), MARGIN, reduction="none")
        return {"loss_per_sample": loss}


def _tiny_forward(params, batch):
    """TinyTask's forward written out on explicit tensors (no module, no functional_call)."""
    video_emb = F.normalize(batch["video"] @ params["video.weight"].T + params["video.bias"], dim=-1)
    text_emb = F.normalize(batch["text"] @ params["text.weight"].T + params["text.bias"], dim=-1)
    scale = params["logit_scale.log_scale"].exp()
    return angular_margin_nce(video_emb, text_emb, scale, MARGIN, reduction="none")


def _tiny_batch(n, gen):
    return {"video": torch.randn(n, 6, generator=gen), "text": torch.randn(n, 5, generator=gen)}


def _reference_step(task, wnet, cfg, train_batch, meta_batch):
    """The meta step's three stages, by hand. Returns (updated wnet params, meta loss, weights, grads)."""
    theta = dict(task.named_parameters())
    virtual = (
        list(theta)
        if not cfg.virtual_params
        else [name for name in theta if any(name.startswith(p + ".") or name == p for p in cfg.virtual_params)]
    )
    wnet_params = list(wnet.parameters())

    def weigh(raw):
        return raw / raw.sum() if cfg.normalize else raw

    # Stage 1: virtual SGD step on the weighted training loss, keeping the graph to the weights.
    losses = _tiny_forward(theta, train_batch)
    weights = weigh(wnet(losses.detach()))
    grads = torch.autograd.grad((weights * losses).sum(), [theta[n] for n in virtual], create_graph=True)
    theta_hat = dict(theta)
    for name, grad in zip(virtual, grads, strict=True):
        theta_hat[name] = theta[name] - cfg.virtual_lr * grad

    # Stage 2: unweighted meta loss of theta_hat, one optimiser step on the weighting net.
    meta_loss = _tiny_forward(theta_hat, meta_batch).mean()
    wnet_grads = torch.autograd.grad(meta_loss, wnet_params)
    with torch.no_grad():
        if cfg.optimizer == "sgd":
            # First step: momentum buffers start at the gradient, so momentum has no effect yet.
            updated = [p - cfg.lr * g for p, g in zip(wnet_params, wnet_grads, strict=True)]
        else:
            # First Adam step: bias-corrected m = g and v = g^2, so the step is lr * g / (|g| + eps).
            updated = [p - cfg.lr * g / (g.abs() + 1e-8) for p, g in zip(wnet_params, wnet_grads, strict=True)]
        for p, new in zip(wnet_params, updated, strict=True):
            p.copy_(new)

    # Stage 3: weights from the updated net, no grad; gradient of the weighted loss at theta.
    losses = _tiny_forward(theta, train_batch)
    with torch.no_grad():
        weights = weigh(wnet(losses))
    real_grads = torch.autograd.grad((weights * losses).sum(), list(theta.values()))
    return [p.detach().clone() for p in updated], meta_loss.item(), weights, real_grads


REFERENCE_CASES = [
    pytest.param(
        MetaConfig(interval=1, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.7, virtual_params=[]),
        id="sgd-all",
    ),
    pytest.param(
        MetaConfig(interval=1, zero_init=False, optimizer="adam", lr=0.01, virtual_lr=0.7, virtual_params=[]),
        id="adam-all",
    ),
    # Unnormalised weights sum to ~6 here: a smaller virtual step keeps the virtual logit scale sane
    # (at 0.7 it reaches exp(-30), the meta loss flattens to 2 ln 6 and the net would not move).
    pytest.param(
        MetaConfig(
            interval=1, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.05, normalize=False, virtual_params=[]
        ),
        id="sgd-unnormalised",
    ),
    pytest.param(
        MetaConfig(interval=1, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.7, virtual_params=["text"]),
        id="sgd-text",
    ),
    pytest.param(
        MetaConfig(
            interval=1,
            zero_init=False,
            optimizer="adam",
            lr=0.01,
            virtual_lr=0.7,
            virtual_params=["video.weight", "logit_scale"],
        ),
        id="adam-subset",
    ),
]


@pytest.mark.parametrize("cfg", REFERENCE_CASES)
def test_meta_step_matches_hand_written_reference(cfg, float64_default):
    torch.manual_seed(0)
    task = TinyTask()
    meta = MetaWeighting(cfg, task)
    reference_wnet = copy.deepcopy(meta.wnet)
    initial = [p.detach().clone() for p in meta.wnet.parameters()]
    gen = torch.Generator().manual_seed(1)
    train_batch, meta_batch = _tiny_batch(8, gen), _tiny_batch(6, gen)

    expected_params, expected_meta_loss, expected_weights, expected_grads = _reference_step(
        task, reference_wnet, cfg, train_batch, meta_batch
    )

    losses = task(train_batch)["loss_per_sample"]
    result = meta.step(task, losses, meta_batch, step=0)
    got_grads = torch.autograd.grad((result.weights * losses).sum(), list(task.parameters()))

    assert result.meta_loss == pytest.approx(expected_meta_loss, abs=1e-10)
    for got, expected, before in zip(meta.wnet.parameters(), expected_params, initial, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-10)
        assert (got.detach() - before).abs().max() > 1e-6, "the weighting net must have moved"
    torch.testing.assert_close(result.weights, expected_weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.loss_per_sample, losses.detach(), rtol=0, atol=0)
    for got, expected in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    if cfg.normalize:
        assert result.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_virtual_subset_changes_the_meta_gradient(float64_default):
    # Guards the subset cases above: restricting the virtual step must matter for this task.
    gen = torch.Generator().manual_seed(1)
    train_batch, meta_batch = _tiny_batch(8, gen), _tiny_batch(6, gen)
    moved = []
    for virtual_params in ([], ["text"]):
        torch.manual_seed(0)
        task = TinyTask()
        meta = MetaWeighting(
            MetaConfig(
                interval=1, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.7, virtual_params=virtual_params
            ),
            task,
        )
        meta.meta_update(task, task(train_batch)["loss_per_sample"], meta_batch)
        moved.append(torch.cat([p.detach().flatten() for p in meta.wnet.parameters()]))
    assert (moved[0] - moved[1]).abs().max() > 1e-6


def test_meta_update_leaves_the_model_untouched(float64_default):
    torch.manual_seed(0)
    task = TinyTask()
    before = copy.deepcopy(task.state_dict())
    meta = MetaWeighting(
        MetaConfig(interval=1, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.7, virtual_params=[]), task
    )
    gen = torch.Generator().manual_seed(1)
    train_batch, meta_batch = _tiny_batch(8, gen), _tiny_batch(6, gen)
    meta.meta_update(task, task(train_batch)["loss_per_sample"], meta_batch)
    for name, value in task.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
        assert task.get_parameter(name).grad is None


# --- meta interval ------------------------------------------------------------------------------


def test_meta_interval_updates_only_on_multiples():
    torch.manual_seed(0)
    task = TinyTask()
    meta = MetaWeighting(
        MetaConfig(zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.7, interval=3, virtual_params=[]), task
    )
    gen = torch.Generator().manual_seed(1)
    changed_on = []
    for step in range(8):
        before = [p.detach().clone() for p in meta.wnet.parameters()]
        train_batch, meta_batch = _tiny_batch(8, gen), _tiny_batch(6, gen)
        result = meta.step(task, task(train_batch)["loss_per_sample"], meta_batch, step)
        changed = any((p.detach() != b).any() for p, b in zip(meta.wnet.parameters(), before, strict=True))
        if changed:
            changed_on.append(step)
        assert (result.meta_loss is not None) == (step % 3 == 0)
    assert changed_on == [0, 3, 6]

    before = [p.detach().clone() for p in meta.wnet.parameters()]
    result = meta.step(task, task(_tiny_batch(8, gen))["loss_per_sample"], None, step=9)
    assert result.meta_loss is None
    assert all((p.detach() == b).all() for p, b in zip(meta.wnet.parameters(), before, strict=True))


# --- the weighting net learns to down-weight corrupted samples ----------------------------------


class _Classifier(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, classes)

    def forward(self, batch):
        return {"loss_per_sample": F.cross_entropy(self.linear(batch["x"]), batch["y"], reduction="none")}


def _train_with_noisy_labels(
    seed: int, zero_init: bool, steps: int = 200, noisy_fraction: float = 0.4, method: str = "exact"
):
    """Linear softmax classifier on Gaussian clusters, 40% of training labels flipped, clean meta set.

    Returns the mean weight (x batch size, so uniform = 1) of clean and corrupted samples over the
    last 100 steps, what the *initial* weighting net gives the same losses, and the two nets.
    """
    dim, classes, n, batch_size = 10, 4, 1024, 64
    torch.manual_seed(seed)
    means = torch.randn(classes, dim)

    def sample(m):
        labels = torch.randint(0, classes, (m,))
        return means[labels] + torch.randn(m, dim), labels

    x, labels = sample(n)
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n)[: int(noisy_fraction * n)]] = True
    # A corrupted label is always wrong: shifted by 1..classes-1.
    noisy = torch.where(corrupted, (labels + torch.randint(1, classes, (n,))) % classes, labels)
    meta_x, meta_labels = sample(128)

    task = _Classifier(dim, classes)
    meta = MetaWeighting(
        MetaConfig(
            interval=1, zero_init=zero_init, optimizer="adam", lr=1e-3, virtual_lr=0.5, virtual_params=[], method=method
        ),
        task,
    )
    initial_wnet = copy.deepcopy(meta.wnet)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.5)
    weights = {"clean": [], "corrupted": [], "init_clean": [], "init_corrupted": []}
    seen_losses = []
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,))
        meta_idx = torch.randint(0, 128, (32,))
        train_batch = {"x": x[idx], "y": noisy[idx]}
        losses = task(train_batch)["loss_per_sample"]
        result = meta.step(
            task,
            losses,
            {"x": meta_x[meta_idx], "y": meta_labels[meta_idx]},
            step,
            train_forward=lambda params, b=train_batch: functional_call(task, params, (b,))["loss_per_sample"],
        )
        optimizer.zero_grad()
        (result.weights * losses).sum().backward()
        optimizer.step()
        if step >= steps - 100:
            with torch.no_grad():
                initial = normalize_weights(initial_wnet(losses.detach()))
            bad = corrupted[idx]
            weights["clean"].append(batch_size * result.weights[~bad])
            weights["corrupted"].append(batch_size * result.weights[bad])
            weights["init_clean"].append(batch_size * initial[~bad])
            weights["init_corrupted"].append(batch_size * initial[bad])
            seen_losses.append(losses.detach())
    means = {k: torch.cat(v).mean().item() for k, v in weights.items()}
    return means, torch.cat(seen_losses), initial_wnet, meta.wnet


@pytest.mark.parametrize(("seed", "zero_init"), [(1, False), (5, False), (0, True), (1, True)])
def test_weight_net_learns_to_down_weight_corrupted_samples(seed, zero_init):
    mean_weight, seen_losses, initial_wnet, learned_wnet = _train_with_noisy_labels(seed, zero_init)
    if zero_init:
        # The default init is flat: every sample starts with the same weight.
        assert mean_weight["init_corrupted"] == pytest.approx(mean_weight["init_clean"])
    else:
        # Seeds 1 and 5 start from a random net that gives corrupted (high-loss) samples *more* weight
        # (1.30x and 1.24x), so the down-weighting below is learned, not inherited from the init.
        assert mean_weight["init_corrupted"] > mean_weight["init_clean"]
    # Observed over seeds 0..11: corrupted / clean = 0.03 .. 0.13 (clean 1.53 .. 1.63, corrupted
    # 0.05 .. 0.19), whatever the initial net did (its ratio on the same losses: 0.15 .. 1.30).
    assert mean_weight["corrupted"] / mean_weight["clean"] < 0.5
    assert mean_weight["clean"] > 1.2

    # The learned loss -> weight map decreases over the whole range of losses seen at the end.
    grid = torch.linspace(seen_losses.min().item(), seen_losses.max().item(), 200)
    with torch.no_grad():
        learned = learned_wnet(grid)
        initial = initial_wnet(grid)
    assert (learned[1:] - learned[:-1]).max() <= 1e-6
    assert learned[-1] < 0.1 * learned[0]
    assert (learned - initial).abs().max() > 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_meta_step_also_learns_to_down_weight_corrupted_samples(seed):
    mean_weight, seen_losses, _, learned_wnet = _train_with_noisy_labels(seed, zero_init=True, method="first_order")
    assert mean_weight["corrupted"] / mean_weight["clean"] < 0.5
    grid = torch.linspace(seen_losses.min().item(), seen_losses.max().item(), 200)
    with torch.no_grad():
        learned = learned_wnet(grid)
    assert learned[-1] < 0.5 * learned[0]


def test_first_order_meta_gradient_approximates_the_exact_one(float64_default):
    """With a small virtual step the linearisation is accurate: both methods move the weighting net
    in nearly the same direction from the same state."""
    torch.manual_seed(0)
    task = _Classifier(6, 3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    mx, my = torch.randn(16, 6), torch.randint(0, 3, (16,))
    deltas = {}
    for method in ("exact", "first_order"):
        torch.manual_seed(1)
        meta = MetaWeighting(
            MetaConfig(
                interval=1,
                zero_init=False,
                optimizer="sgd",
                lr=1.0,
                virtual_lr=1e-3,
                virtual_params=[],
                method=method,
                fd_step=1e-5,
            ),
            task,
        )
        meta.wnet.double()
        before = torch.cat([p.detach().flatten().clone() for p in meta.wnet.parameters()])
        losses = task({"x": x, "y": y})["loss_per_sample"]
        meta.step(
            task,
            losses,
            {"x": mx, "y": my},
            0,
            train_forward=lambda params: functional_call(task, params, ({"x": x, "y": y},))["loss_per_sample"],
        )
        deltas[method] = torch.cat([p.detach().flatten() for p in meta.wnet.parameters()]) - before
    cos = F.cosine_similarity(deltas["exact"], deltas["first_order"], dim=0).item()
    assert deltas["exact"].norm() > 0
    assert cos > 0.99, cos
    assert deltas["first_order"].norm() / deltas["exact"].norm() == pytest.approx(1.0, rel=0.05)


def test_first_order_needs_the_training_forward():
    task = _Classifier(4, 2)
    meta = MetaWeighting(MetaConfig(method="first_order", virtual_params=[]), task)
    losses = task({"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])})["loss_per_sample"]
    with pytest.raises(ValueError, match="train_forward"):
        meta.step(task, losses, {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])}, 0)


# --- a real model with scaled_dot_product_attention ---------------------------------------------


def test_meta_step_through_attention_model():
    torch.manual_seed(0)
    captions = [
        "a red ball moves left",
        "a blue square moves right",
        "two circles bounce",
        "a green ball falls down",
        "a square spins slowly",
        "the red circle grows",
    ]
    model_cfg = ModelConfig(
        width=32,
        heads=2,
        embed_dim=16,
        video_layers=1,
        text_layers=1,
        stem_channels=4,
        frame_size=16,
        max_frames=4,
        max_text_length=12,
    )
    tokenizer = WordTokenizer.build(captions, max_length=model_cfg.max_text_length)
    task = RetrievalModule(create_model(model_cfg, tokenizer), LossConfig(margin=0.05))

    def batch(texts):
        input_ids, attention_mask = tokenizer(texts)
        video = torch.randn(len(texts), 4, 3, 16, 16)  # (B, T, C, H, W)
        return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask}

    train_batch, meta_batch = batch(captions[:4]), batch(captions[2:])
    meta = MetaWeighting(
        MetaConfig(interval=1, zero_init=False, optimizer="adam", lr=1e-2, virtual_lr=1.0, virtual_params=[]), task
    )
    before = [p.detach().clone() for p in meta.wnet.parameters()]

    with meta_forward_context(True):
        losses = task(train_batch)["loss_per_sample"]
        result = meta.step(task, losses, meta_batch, step=0)
    (result.weights * losses).sum().backward()

    assert result.meta_loss is not None and math.isfinite(result.meta_loss)
    assert any((p.detach() - b).abs().max() > 1e-6 for p, b in zip(meta.wnet.parameters(), before, strict=True))
    for name, param in task.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("interval", [1, 2, 4])
def test_weighting_net_lr_is_per_training_step(interval):
    """An update every k steps uses k * meta.lr, so the net moves as far over a run."""
    task = _Classifier(4, 2)
    meta = MetaWeighting(MetaConfig(lr=1e-4, interval=interval, virtual_params=[]), task)
    assert meta.optimizer.param_groups[0]["lr"] == pytest.approx(interval * 1e-4)
