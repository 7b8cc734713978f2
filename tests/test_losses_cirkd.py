"""CIRKD losses and the cross-process gather, against loop-based NumPy references.

References are written from the formulas of CIRKD (Yang et al., CVPR 2022) as documented in
`fotf_hf/losses/cirkd.py`, not from the code under test.
"""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fotf_hf.losses.base import LossInputs
from fotf_hf.losses.cirkd import CIRKDMemoryLoss, CIRKDPairLoss
from fotf_hf.losses.distributed import gather_across_processes, is_distributed


def np_normalize(x, axis):
    return x / np.maximum(np.sqrt((x**2).sum(axis=axis, keepdims=True)), 1e-12)


def np_log_softmax(x):
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def np_kl(logits_t, logits_s):
    """KL(softmax(t) || softmax(s)) of two 1-D logit vectors, by explicit sums."""
    lt, ls = np_log_softmax(logits_t), np_log_softmax(logits_s)
    return sum(np.exp(lt[k]) * (lt[k] - ls[k]) for k in range(len(lt)))


def np_avg_pool_ceil(x, k):
    """(B, C, H, W) average pooling with ceil_mode: border windows average their in-bounds elements."""
    b, c, h, w = x.shape
    oh, ow = -(-h // k), -(-w // k)
    out = np.zeros((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * k : (i + 1) * k, j * k : (j + 1) * k].mean(axis=(2, 3))
    return out


def np_cirkd_pair(fs, ft, tau):
    b, _, h, w = fs.shape
    fs = np_normalize(fs.reshape(b, fs.shape[1], h * w), 1)
    ft = np_normalize(ft.reshape(b, ft.shape[1], h * w), 1)
    total = 0.0
    for i in range(b):
        for j in range(b):
            pair = 0.0
            for p in range(h * w):
                row_s = np.array([fs[i, :, p] @ fs[j, :, q] for q in range(h * w)]) / tau
                row_t = np.array([ft[i, :, p] @ ft[j, :, q] for q in range(h * w)]) / tau
                pair += np_kl(row_t, row_s)
            total += pair / (h * w)
    return total / b**2


def make_inputs(b=2, ds=4, dt=6, h=5, w=5, num_classes=3, label_size=None, dtype=torch.float32, **extra):
    label_size = label_size or (h, w)
    return LossInputs(
        student_logits=torch.randn(b, num_classes, h, w),
        labels=torch.randint(0, num_classes, (b, *label_size)),
        student_embedding=torch.randn(b, ds, h, w, dtype=dtype, requires_grad=True),
        teacher_embedding=torch.randn(b, dt, h, w, dtype=dtype, requires_grad=True),
        **extra,
    )


# ----------------------------------------------------------------------------- mini-batch pair loss


@pytest.mark.parametrize("ds,dt,tau", [(4, 6, 0.1), (5, 5, 0.5)])
def test_pair_loss_matches_loop_reference(ds, dt, tau):
    inputs = make_inputs(b=3, ds=ds, dt=dt, h=3, w=4)
    out = CIRKDPairLoss(weight=2.0, temperature=tau)(inputs)
    assert set(out) == {"cirkd_pair"}
    expected = 2.0 * np_cirkd_pair(
        inputs.student_embedding.detach().double().numpy(),
        inputs.teacher_embedding.detach().double().numpy(),
        tau,
    )
    assert out["cirkd_pair"].item() == pytest.approx(expected, rel=1e-4)


def test_pair_loss_pooling_uses_ceil_mode_average():
    inputs = make_inputs(b=2, h=5, w=5)
    out = CIRKDPairLoss(pool=2)(inputs)["cirkd_pair"]
    fs = np_avg_pool_ceil(inputs.student_embedding.detach().double().numpy(), 2)
    ft = np_avg_pool_ceil(inputs.teacher_embedding.detach().double().numpy(), 2)
    assert fs.shape[-2:] == (3, 3)
    assert out.item() == pytest.approx(np_cirkd_pair(fs, ft, 0.1), rel=1e-4)


def test_pair_loss_zero_for_identical_features_and_scale_invariant():
    f = torch.randn(2, 4, 4, 4)
    # L2 normalisation makes a positive per-pixel rescaling of the teacher irrelevant.
    inputs = LossInputs(
        student_logits=torch.zeros(2, 3, 4, 4),
        labels=torch.zeros(2, 4, 4, dtype=torch.long),
        student_embedding=f,
        teacher_embedding=f * 3.0,
    )
    assert CIRKDPairLoss()(inputs)["cirkd_pair"].item() == pytest.approx(0.0, abs=1e-6)


def test_pair_loss_gradients_reach_student_only():
    inputs = make_inputs()
    CIRKDPairLoss()(inputs)["cirkd_pair"].backward()
    assert inputs.student_embedding.grad is not None and inputs.student_embedding.grad.abs().sum() > 0
    assert inputs.teacher_embedding.grad is None


def test_pair_loss_resizes_teacher_to_student_size():
    inputs = make_inputs(h=4, w=4)
    big_teacher = torch.randn(2, 6, 8, 8)
    got = CIRKDPairLoss()(LossInputs(**{**inputs.__dict__, "teacher_embedding": big_teacher}))["cirkd_pair"]
    resized = F.interpolate(big_teacher, size=(4, 4), mode="bilinear", align_corners=False)
    expected = np_cirkd_pair(
        inputs.student_embedding.detach().double().numpy(), resized.double().numpy(), 0.1
    )
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_pair_loss_errors():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="teacher_embedding, got None"):
        CIRKDPairLoss()(LossInputs(**{**inputs.__dict__, "teacher_embedding": None}))
    with pytest.raises(ValueError, match="student_embedding, got None"):
        CIRKDPairLoss()(LossInputs(**{**inputs.__dict__, "student_embedding": None}))
    with pytest.raises(ValueError, match="batch size"):
        CIRKDPairLoss()(LossInputs(**{**inputs.__dict__, "teacher_embedding": torch.randn(3, 6, 5, 5)}))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        CIRKDPairLoss()(LossInputs(**{**inputs.__dict__, "teacher_embedding": torch.randn(2, 6, 5)}))
    with pytest.raises(ValueError, match="temperature"):
        CIRKDPairLoss(temperature=0)
    with pytest.raises(ValueError, match="pool"):
        CIRKDPairLoss(pool=1.5)


# ----------------------------------------------------------------------------- memory loss


def np_projection(module, x):
    """The projection head in eval mode, by hand: W2 relu(BN(W1 x)) with BN's running statistics."""
    head = module.project_head
    w1 = head[0].weight.detach().double().numpy()[:, :, 0, 0]
    bn = head[1]
    w2 = head[3].weight.detach().double().numpy()[:, :, 0, 0]
    y = np.einsum("oc,bchw->bohw", w1, x)
    scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    shift = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale
    y = np.maximum(y * scale[None, :, None, None] + shift[None, :, None, None], 0)
    return np.einsum("oc,bchw->bohw", w2, y)


def np_memory_loss(module, fs, ft, labels_small, tau, tau_kd):
    """Both terms by loops, with every memory slot taken as a contrast entry."""
    s = np_normalize(np_projection(module, fs), 1)
    t = np_normalize(ft, 1)
    pixel_mem = module.pixel_queue.double().numpy().reshape(-1, t.shape[1])
    region_mem = module.region_queue.double().numpy().reshape(-1, t.shape[1])
    totals = []
    for memory in (pixel_mem, region_mem):
        total, count = 0.0, 0
        for b in range(fs.shape[0]):
            for i in range(fs.shape[2]):
                for j in range(fs.shape[3]):
                    if labels_small[b, i, j] == 255:
                        continue
                    ls = np.array([s[b, :, i, j] @ m for m in memory]) / tau
                    lt = np.array([t[b, :, i, j] @ m for m in memory]) / tau
                    total += np_kl(lt / tau_kd, ls / tau_kd)
                    count += 1
        totals.append(tau_kd**2 * total / count)
    return totals


def small_memory_loss(**kw):
    # Contrast sizes far above the memory sizes: every slot of every class is sampled, so the loss
    # is a deterministic function of the memory (the softmax is invariant to the slot order).
    args = dict(
        student_channels=4,
        teacher_channels=6,
        num_classes=3,
        pixel_memory_size=7,
        region_memory_size=4,
        pixel_contrast_size=1000,
        region_contrast_size=1000,
    )
    args.update(kw)
    return CIRKDMemoryLoss(**args)


def test_memory_loss_matches_loop_reference_in_eval_mode():
    loss = small_memory_loss(kd_temperature=2.0, pixel_weight=0.3, region_weight=0.7)
    with torch.no_grad():  # non-trivial BN statistics, so the hand-made projection is really tested
        loss.project_head[1].running_mean.uniform_(-0.5, 0.5)
        loss.project_head[1].running_var.uniform_(0.5, 2.0)
        loss.project_head[1].weight.uniform_(0.5, 1.5)
        loss.project_head[1].bias.uniform_(-0.2, 0.2)
    loss.eval()
    inputs = make_inputs(h=4, w=4, label_size=(8, 8))
    inputs.labels[0, :4, :] = 255
    before = loss.pixel_queue.clone()
    out = loss(inputs)
    assert torch.equal(loss.pixel_queue, before), "eval mode must not write the memory"
    labels_small = inputs.labels[:, ::2, ::2].numpy()  # nearest resize 8x8 -> 4x4
    pix, reg = np_memory_loss(
        loss,
        inputs.student_embedding.detach().double().numpy(),
        inputs.teacher_embedding.detach().double().numpy(),
        labels_small,
        0.1,
        2.0,
    )
    assert out["cirkd_pixel"].item() == pytest.approx(0.3 * pix, rel=1e-4)
    assert out["cirkd_region"].item() == pytest.approx(0.7 * reg, rel=1e-4)


def test_memory_samples_per_class_follow_cirkd_division():
    loss = CIRKDMemoryLoss(4, 6, 19, pixel_memory_size=30, region_memory_size=10)
    assert (loss.pixel_samples_per_class, loss.region_samples_per_class) == (216, 54)
    assert loss._sample_memory(loss.pixel_queue, 216).shape == (19 * 30, 6)  # capped by the memory size
    assert loss._sample_memory(loss.region_queue, 3).shape == (19 * 3, 6)
    assert CIRKDMemoryLoss(4, 6, 11, 30, 10).pixel_samples_per_class == 373  # CamVid


def test_memory_buffers_are_normalised_and_in_state_dict():
    loss = small_memory_loss()
    state = loss.state_dict()
    for key, shape in [
        ("pixel_queue", (3, 7, 6)),
        ("region_queue", (3, 4, 6)),
        ("pixel_queue_ptr", (3,)),
        ("region_queue_ptr", (3,)),
    ]:
        assert tuple(state[key].shape) == shape
    assert torch.allclose(loss.pixel_queue.norm(dim=2), torch.ones(3, 7), atol=1e-5)
    assert isinstance(loss.project_head[1], torch.nn.BatchNorm2d)
    restored = small_memory_loss()
    restored.load_state_dict(state)
    assert torch.equal(restored.pixel_queue, loss.pixel_queue)


def _rows_as_set(x):
    return {tuple(np.round(r, 5)) for r in x.tolist()}


def test_enqueue_writes_region_means_and_pixel_samples():
    loss = small_memory_loss(pixel_memory_size=40, region_memory_size=4)
    # 1 image, 6x6: class 0 has 3 pixels, class 1 has 20 (> 16 = update frequency), class 2 is absent,
    # the rest is ignored.
    labels = torch.full((1, 6, 6), 255)
    labels.view(-1)[:3] = 0
    labels.view(-1)[3:23] = 1
    teacher = F.normalize(torch.randn(1, 6, 6, 6), dim=1)
    before = loss.pixel_queue.clone(), loss.region_queue.clone()
    loss.enqueue(teacher, labels)
    flat = teacher[0].reshape(6, -1).t().numpy()
    for c, idx, n_written in [(0, range(0, 3), 3), (1, range(3, 23), 16)]:
        mean = flat[list(idx)].mean(axis=0)
        np.testing.assert_allclose(
            loss.region_queue[c, 0].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6
        )
        assert int(loss.region_queue_ptr[c]) == 1
        written = loss.pixel_queue[c, :n_written].numpy()
        assert len(_rows_as_set(written)) == n_written  # no duplicates
        assert _rows_as_set(written) <= _rows_as_set(flat[list(idx)])
        assert int(loss.pixel_queue_ptr[c]) == n_written
        assert torch.equal(loss.pixel_queue[c, n_written:], before[0][c, n_written:])
    assert torch.equal(loss.pixel_queue[2], before[0][2]) and torch.equal(loss.region_queue[2], before[1][2])
    assert int(loss.pixel_queue_ptr[2]) == 0


def _enqueue_n(loss, n, value):
    labels = torch.full((1, 1, 16), 255)
    labels[0, 0, :n] = 0
    teacher = torch.zeros(1, 6, 1, 16)
    teacher[:, 0] = 1.0
    teacher[:, 1] = value  # rows tell the batches apart after normalisation
    loss.enqueue(F.normalize(teacher, dim=1), labels)


@pytest.mark.parametrize("legacy", [False, True])
def test_pixel_memory_wraparound(legacy):
    loss = small_memory_loss(pixel_memory_size=5, legacy_enqueue=legacy)
    _enqueue_n(loss, 3, 1.0)
    assert int(loss.pixel_queue_ptr[0]) == 3
    _enqueue_n(loss, 3, 2.0)
    second = F.normalize(torch.tensor([1.0, 2.0, 0, 0, 0, 0]), dim=0)
    first = F.normalize(torch.tensor([1.0, 1.0, 0, 0, 0, 0]), dim=0)
    if legacy:  # CIRKD: ptr + k >= size -> write the last k slots, reset ptr
        expected_slots = {0: first, 1: first, 2: second, 3: second, 4: second}
        assert int(loss.pixel_queue_ptr[0]) == 0
    else:  # ring buffer: slots 3, 4, 0
        expected_slots = {0: second, 1: first, 2: first, 3: second, 4: second}
        assert int(loss.pixel_queue_ptr[0]) == 1
    for slot, row in expected_slots.items():
        torch.testing.assert_close(loss.pixel_queue[0, slot], row)
    # region memory is a plain FIFO of size 4
    assert int(loss.region_queue_ptr[0]) == 2


def test_memory_loss_training_updates_memory_and_grads_reach_student_and_head():
    loss = small_memory_loss()
    loss.train()
    inputs = make_inputs(h=4, w=4)
    before = loss.pixel_queue.clone()
    out = loss(inputs)
    assert set(out) == {"cirkd_pixel", "cirkd_region"}
    assert not torch.equal(loss.pixel_queue, before)
    (out["cirkd_pixel"] + out["cirkd_region"]).backward()
    assert inputs.student_embedding.grad.abs().sum() > 0
    assert inputs.teacher_embedding.grad is None
    for p in loss.project_head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert loss.pixel_queue.grad is None and not loss.pixel_queue.requires_grad


def test_memory_loss_all_ignored_is_zero_and_backpropagates():
    loss = small_memory_loss()
    inputs = make_inputs(h=4, w=4)
    inputs.labels.fill_(255)
    before = loss.pixel_queue.clone()
    out = loss(inputs)
    assert out["cirkd_pixel"].item() == 0.0 and out["cirkd_region"].item() == 0.0
    out["cirkd_pixel"].backward()
    assert torch.equal(loss.pixel_queue, before)  # nothing to enqueue


def test_memory_loss_bf16_inputs_and_autocast_are_fp32_and_close():
    loss = small_memory_loss().eval()
    inputs = make_inputs(h=4, w=4)
    ref = loss(inputs)
    bf16 = LossInputs(
        **{
            **inputs.__dict__,
            "student_embedding": inputs.student_embedding.detach().bfloat16(),
            "teacher_embedding": inputs.teacher_embedding.detach().bfloat16(),
        }
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(bf16)
    for key in ref:
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key])
        assert out[key].item() == pytest.approx(ref[key].item(), rel=0.05)


def test_memory_loss_errors():
    loss = small_memory_loss()
    inputs = make_inputs(h=4, w=4)
    with pytest.raises(ValueError, match="teacher_embedding, got None"):
        loss(LossInputs(**{**inputs.__dict__, "teacher_embedding": None}))
    with pytest.raises(ValueError, match="student_embedding has 5 channels but the loss was built for 4"):
        loss(LossInputs(**{**inputs.__dict__, "student_embedding": torch.randn(2, 5, 4, 4)}))
    with pytest.raises(ValueError, match="teacher_embedding has 7 channels"):
        loss(LossInputs(**{**inputs.__dict__, "teacher_embedding": torch.randn(2, 7, 4, 4)}))
    bad_labels = inputs.labels.clone()
    bad_labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"outside the 3 classes"):
        loss(LossInputs(**{**inputs.__dict__, "labels": bad_labels}))
    with pytest.raises(ValueError, match="pixel_memory_size"):
        small_memory_loss(pixel_memory_size=0)
    with pytest.raises(ValueError, match="kd_temperature"):
        small_memory_loss(kd_temperature=0.0)
    with pytest.raises(ValueError, match="region_weight"):
        small_memory_loss(region_weight=-1.0)


# ----------------------------------------------------------------------------- gather, one and two processes


def test_gather_without_process_group_returns_input():
    assert not is_distributed()
    t = torch.randn(2, 3, requires_grad=True)
    assert gather_across_processes(t) is t
    assert gather_across_processes(t, keep_local_grad=True) is t


def _two_process_worker(rank, init_file, results_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        local = torch.full((1, 2), float(rank + 1), requires_grad=True)
        gathered = gather_across_processes(local, keep_local_grad=True)
        (gathered * torch.tensor([[1.0], [10.0]])).sum().backward()
        torch.manual_seed(0)  # same memory init on both ranks
        loss = small_memory_loss(pixel_memory_size=40)
        loss.train()
        labels = torch.full((1, 2, 2), 255)
        labels[0, 0, 0] = rank  # rank 0 writes class 0, rank 1 writes class 1
        teacher = torch.zeros(1, 6, 2, 2)
        teacher[0, rank, 0, 0] = 1.0
        torch.manual_seed(100 + rank)
        out = loss(
            LossInputs(
                student_logits=torch.zeros(1, 3, 2, 2),
                labels=labels,
                student_embedding=torch.randn(1, 4, 2, 2),
                teacher_embedding=teacher,
            )
        )
        torch.save(
            {
                "gathered": gathered.detach(),
                "grad": local.grad,
                "pixel_queue": loss.pixel_queue,
                "ptr": loss.pixel_queue_ptr,
                "finite": bool(torch.isfinite(out["cirkd_pixel"])),
            },
            os.path.join(results_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_and_memory_enqueue():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_two_process_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # each rank's gradient flows only into its own slice
    assert torch.equal(r0["grad"], torch.ones(1, 2)) and torch.equal(r1["grad"], torch.full((1, 2), 10.0))
    # both ranks enqueued both ranks' teacher pixels, so the memories agree
    assert torch.equal(r0["pixel_queue"], r1["pixel_queue"])
    assert r0["ptr"].tolist() == [1, 1, 0]
    torch.testing.assert_close(r0["pixel_queue"][0, 0], F.one_hot(torch.tensor(0), 6).float())
    torch.testing.assert_close(r0["pixel_queue"][1, 0], F.one_hot(torch.tensor(1), 6).float())
    assert r0["finite"] and r1["finite"]
