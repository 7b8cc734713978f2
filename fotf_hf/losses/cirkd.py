"""CIRKD: cross-image relational knowledge distillation (Yang et al., CVPR 2022), device-agnostic.

Two loss modules, both on the head feature `embedding` (CIRKD's `feat`, DeepLabV3's
`x_feat_after_aspp`), student `(B, Ds, h, w)` and teacher `(B, Dt, h', w')`; the teacher map is
resized to the student's `(h, w)` (bilinear, `align_corners=False`) when they differ:

* `CIRKDPairLoss` (term `cirkd_pair`, CIRKD's `CriterionMiniBatchCrossImagePair`, paper eq. 3):
  mini-batch pixel-to-pixel relations between every ordered pair of images of the per-process
  batch,

      F = L2-normalise_channels(f)                       (B, D, h*w)
      S_ij = F_i^T F_j                                   (h*w, h*w), one map per ordered pair (i, j)
      L = 1/B^2 * sum_{i,j} 1/(h*w) * sum_rows KL(softmax(S^t_ij / tau) || softmax(S^s_ij / tau)),

  tau = 0.1, no tau^2 factor, lambda = 1. Only the similarity maps are compared, so `Ds != Dt` is
  fine. Optional `pool=k`: k x k average pooling (`ceil_mode=True`) of both features first (CIRKD's
  SegFormer variant uses k = 2), which divides the memory of the `(hw)^2` maps by k^4.

* `CIRKDMemoryLoss` (terms `cirkd_pixel`, `cirkd_region`, CIRKD's `StudentSegContrast`, paper
  eq. 5-8): pixel-to-pixel and pixel-to-region relations against class-wise memories of teacher
  embeddings. Student embeddings go through a projection head `1x1 conv(Ds->Dt, no bias) -> BN ->
  ReLU -> 1x1 conv(Dt->Dt, no bias)` and are L2-normalised; teacher embeddings are L2-normalised.
  Labels are resized (nearest) to `(h, w)`; anchors are the non-ignored positions, the same for
  student and teacher. With `X` = `n_pix` memory entries per class drawn from the pixel memory (the
  same random slots for every class, `n_pix = pixel_contrast_size // K + 1` as CIRKD's
  `train_cirkd.py` passes it) and `X_r` likewise from the region memory:

      l^s = a^s X^T / tau,  l^t = a^t X^T / tau            (N_anchors, K * n_pix)
      L_pix = tau_kd^2 * 1/N_anchors * sum_anchors KL(softmax(l^t / tau_kd) || softmax(l^s / tau_kd))

  and the same with `X_r` for `L_region`; tau = 0.1, tau_kd = 1, weights 0.1 / 0.1 (0.01 for VOC).

Memory update (teacher side, no gradient, in training mode only): the batch's normalised teacher
embeddings and resized labels are gathered from every process when a process group exists (one
process: no gather, so single-device runs work, unlike CIRKD). Per image and per present class,
the region memory receives the L2-normalised mean embedding (FIFO, one slot), and the pixel memory
`min(n_c, pixel_update_freq=16)` randomly chosen embeddings of that class. As in CIRKD the memory is
updated *before* it is sampled, so the current batch can appear among its own contrast entries.
Each process draws its own random pixels and contrast slots, so with several processes the
memories may drift apart (as in CIRKD); every process must call `forward` in training mode the
same number of times, since the gather is a collective.

CIRKD's pixel-memory write differs from the one above in two ways; `legacy_enqueue=True`
reproduces the first only, so it does not restore CIRKD's behaviour exactly.

1. Wrap-around (ContrastiveSeg quirk, tfzhou/ContrastiveSeg#31, copied into CIRKD): when
   `ptr + k >= memory size`, CIRKD writes the *last* k slots and resets `ptr` to 0, overwriting up
   to k - 1 of the entries it has just written while older ones survive. By default the pixel
   memory here is a true ring buffer (slots `(ptr + 0..k-1) mod size`, `ptr <- (ptr + k) mod size`),
   so it always holds the most recent entries. `legacy_enqueue=True` uses CIRKD's rule: for the
   same k per call it writes the same slots and leaves the same `ptr` as CIRKD.

2. Which embeddings are written (not reproduced by either setting). CIRKD's `_dequeue_and_enqueue`
   (winycg/CIRKD v1 `losses/cirkd_memory.py`, lines 99-101) does, per image and present class c:

       perm = torch.randperm(num_pixel)        # num_pixel = n_c, the pixels of class c in the image
       K = min(num_pixel, self.pixel_update_freq)
       feat = this_feat[:, perm[:K]]            # this_feat: (D, h*w), every position of the image

   The permutation runs over 0..n_c-1 but indexes the image's whole flattened map without going
   through the class's positions (`idxs`), so CIRKD's K "class c" entries are random positions
   among the first n_c positions of the image in row-major order, whatever their label (other
   classes and ignored positions included); they are class c only where those positions happen to
   be. Here both settings write K random embeddings of class c (`idx[randperm(n_c)[:k]]`), i.e.
   what a class-wise memory is meant to hold. The count K = min(n_c, 16) and the region memory
   (mean over the class's own positions, one FIFO slot) are the same as CIRKD's.

Also left with `legacy_enqueue=True`: the random draws come from other streams (CIRKD calls
`torch.randperm` on the CPU generator, here on the embeddings' device), so runs are not
bit-identical to CIRKD's even where the rules agree; and k is also capped at `pixel_memory_size`
(CIRKD has no cap; it only matters for memories smaller than `pixel_update_freq`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._feature_utils import fp32_off_autocast, require_field, resize_labels_nearest, student_teacher_pair
from .base import LossInputs
from .registry import TermContext, register_method, register_term
from .ce import check_labels
from .distributed import gather_across_processes

__all__ = ["pairwise_similarity_kl", "CIRKDPairLoss", "CIRKDMemoryLoss"]


def pairwise_similarity_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """CIRKD mini-batch pixel-to-pixel loss on fp32 features of equal spatial size.

    Args:
        student: `(B, Ds, h, w)` student features (not yet normalised).
        teacher: `(B, Dt, h, w)` teacher features (constants).
        temperature: tau of the similarity softmax.

    Returns:
        Scalar (nats): `1/B^2 sum_{i,j} 1/(hw) sum_rows KL(softmax(S^t_ij/tau) || softmax(S^s_ij/tau))`.
    """
    batch = student.shape[0]
    fs = F.normalize(student, p=2, dim=1).flatten(2)  # (B, Ds, hw)
    ft = F.normalize(teacher, p=2, dim=1).flatten(2)
    rows = fs.shape[-1]
    total = student.new_zeros(())
    # One (hw, hw) map per ordered pair, as CIRKD: a batched (B, B, hw, hw) tensor would need B^2
    # times the memory (several GB at Cityscapes crops).
    for i in range(batch):
        for j in range(batch):
            log_ps = F.log_softmax(fs[i].t() @ fs[j] / temperature, dim=1)
            log_pt = F.log_softmax(ft[i].t() @ ft[j] / temperature, dim=1)
            total = total + (log_pt.exp() * (log_pt - log_ps)).sum() / rows
    return total / batch**2


class CIRKDPairLoss(nn.Module):
    """CIRKD mini-batch pixel-to-pixel distillation, term `cirkd_pair` (formula in the module docstring).

    Args:
        weight: lambda of the term (1 in CIRKD's scripts).
        temperature: tau of the similarity softmax (0.1, CIRKD's `--contrast-temperature`).
        pool: None / 0 for no pooling, or k >= 1 for k x k average pooling (`ceil_mode=True`) of both
            features before the similarity maps (2 in CIRKD's SegFormer script).

    Inputs used: `student_embedding` `(B, Ds, h, w)`, `teacher_embedding` `(B, Dt, h', w')`.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 0.1, pool: Optional[int] = None):
        super().__init__()
        if weight < 0:
            raise ValueError(f"CIRKDPairLoss weight = {weight} must be >= 0")
        if temperature <= 0:
            raise ValueError(f"CIRKDPairLoss temperature = {temperature} must be > 0")
        if pool is not None and (int(pool) != pool or pool < 0):
            raise ValueError(
                f"CIRKDPairLoss pool = {pool!r} must be None, 0 (no pooling) "
                f"or a positive integer kernel size"
            )
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.pool = int(pool) if pool else 0

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        name = type(self).__name__
        student = require_field(inputs, "student_embedding", name)
        teacher = require_field(inputs, "teacher_embedding", name)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(student, teacher, name, "student_embedding", "teacher_embedding")
            if self.pool > 1:
                s = F.avg_pool2d(s, self.pool, self.pool, ceil_mode=True)
                t = F.avg_pool2d(t, self.pool, self.pool, ceil_mode=True)
            loss = pairwise_similarity_kl(s, t, self.temperature)
        return {"cirkd_pair": self.weight * loss}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, pool={self.pool}"


class CIRKDMemoryLoss(nn.Module):
    """CIRKD memory-based pixel-to-pixel and pixel-to-region distillation (module docstring).

    Args:
        student_channels: Ds, width of the student embedding.
        teacher_channels: Dt, width of the teacher embedding (and of the memories).
        num_classes: K, number of classes (one memory row per class).
        pixel_memory_size: entries per class in the pixel memory (20000; 2000 in CIRKD's SegFormer run).
        region_memory_size: entries per class in the region memory (2000).
        pixel_contrast_size: total pixel-memory entries sampled per step; `pixel_contrast_size // K + 1`
            per class (4096).
        region_contrast_size: same for the region memory (1024).
        contrast_temperature: tau of the anchor-memory similarities (0.1).
        kd_temperature: tau_kd of the KL between the similarity distributions (1).
        pixel_weight / region_weight: lambdas of the two terms (0.1; 0.01 for VOC).
        ignore_index: label value without a class (255).
        pixel_update_freq: at most this many embeddings per image and class enter the pixel memory (16).
        legacy_enqueue: use CIRKD's wrap-around rule for the pixel memory (write the last k slots,
            reset ptr to 0) instead of a ring buffer. The written embeddings stay k random ones of
            the class, unlike CIRKD's (module docstring, point 2), so this is not CIRKD exactly.

    Buffers (saved in `state_dict`): `pixel_queue` `(K, pixel_memory_size, Dt)`, `pixel_queue_ptr`
    `(K,)`, `region_queue` `(K, region_memory_size, Dt)`, `region_queue_ptr` `(K,)`. The pixel memory
    is large: 19 x 20000 x 256 x 4 B = 389 MB for Cityscapes with a ResNet-101 teacher.

    Inputs used: `student_embedding`, `teacher_embedding`, `labels` `(B, H, W)`.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        contrast_temperature: float = 0.1,
        kd_temperature: float = 1.0,
        pixel_weight: float = 0.1,
        region_weight: float = 0.1,
        ignore_index: int = 255,
        pixel_update_freq: int = 16,
        legacy_enqueue: bool = False,
    ):
        super().__init__()
        for arg, value in dict(
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            num_classes=num_classes,
            pixel_memory_size=pixel_memory_size,
            region_memory_size=region_memory_size,
            pixel_contrast_size=pixel_contrast_size,
            region_contrast_size=region_contrast_size,
            pixel_update_freq=pixel_update_freq,
        ).items():
            if int(value) != value or value < 1:
                raise ValueError(f"CIRKDMemoryLoss {arg} = {value!r} must be a positive integer")
        for arg, value in dict(
            contrast_temperature=contrast_temperature, kd_temperature=kd_temperature
        ).items():
            if value <= 0:
                raise ValueError(f"CIRKDMemoryLoss {arg} = {value} must be > 0")
        for arg, value in dict(pixel_weight=pixel_weight, region_weight=region_weight).items():
            if value < 0:
                raise ValueError(f"CIRKDMemoryLoss {arg} = {value} must be >= 0")
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.num_classes = int(num_classes)
        self.pixel_memory_size = int(pixel_memory_size)
        self.region_memory_size = int(region_memory_size)
        self.pixel_contrast_size = int(pixel_contrast_size)
        self.region_contrast_size = int(region_contrast_size)
        # CIRKD's train_cirkd.py passes `size // num_classes + 1` samples per class to the loss.
        self.pixel_samples_per_class = self.pixel_contrast_size // self.num_classes + 1
        self.region_samples_per_class = self.region_contrast_size // self.num_classes + 1
        self.contrast_temperature = float(contrast_temperature)
        self.kd_temperature = float(kd_temperature)
        self.pixel_weight = float(pixel_weight)
        self.region_weight = float(region_weight)
        self.ignore_index = int(ignore_index)
        self.pixel_update_freq = int(pixel_update_freq)
        self.legacy_enqueue = bool(legacy_enqueue)

        # Plain BatchNorm2d so that one device works; the training loop converts it to SyncBatchNorm
        # on multi-GPU CUDA runs (CIRKD hard-codes SyncBatchNorm, CIRKD issue #18).
        self.project_head = nn.Sequential(
            nn.Conv2d(self.student_channels, self.teacher_channels, 1, bias=False),
            nn.BatchNorm2d(self.teacher_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.teacher_channels, self.teacher_channels, 1, bias=False),
        )
        K, D = self.num_classes, self.teacher_channels
        self.register_buffer(
            "pixel_queue", F.normalize(torch.randn(K, self.pixel_memory_size, D), p=2, dim=2)
        )
        self.register_buffer("pixel_queue_ptr", torch.zeros(K, dtype=torch.long))
        self.register_buffer(
            "region_queue", F.normalize(torch.randn(K, self.region_memory_size, D), p=2, dim=2)
        )
        self.register_buffer("region_queue_ptr", torch.zeros(K, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """Write one batch of teacher embeddings into the memories (module docstring).

        Args:
            teacher: `(B, Dt, h, w)` L2-normalised teacher embeddings.
            labels: `(B, h, w)` int64 labels at the embedding size, `ignore_index` = no class.
                Both are gathered from every process first when a process group exists.
        """
        teacher = gather_across_processes(teacher.detach().float())
        labels = gather_across_processes(labels)
        for feat, lab in zip(teacher.flatten(2), labels.flatten(1)):  # feat (Dt, hw), lab (hw,)
            for c in torch.unique(lab).tolist():
                if c == self.ignore_index:
                    continue
                idx = torch.nonzero(lab == c, as_tuple=False)[:, 0]
                self._enqueue_region(c, F.normalize(feat[:, idx].mean(dim=1), p=2, dim=0))
                k = min(idx.numel(), self.pixel_update_freq, self.pixel_memory_size)
                # k random positions of class c. CIRKD indexes the whole map with randperm(n_c)[:k]
                # instead (module docstring, point 2); legacy_enqueue does not copy that.
                chosen = idx[torch.randperm(idx.numel(), device=idx.device)[:k]]
                self._enqueue_pixels(c, F.normalize(feat[:, chosen].t(), p=2, dim=1))

    def _enqueue_region(self, c: int, key: torch.Tensor) -> None:
        ptr = int(self.region_queue_ptr[c])
        self.region_queue[c, ptr] = key
        self.region_queue_ptr[c] = (ptr + 1) % self.region_memory_size

    def _enqueue_pixels(self, c: int, keys: torch.Tensor) -> None:
        k, size = keys.shape[0], self.pixel_memory_size
        ptr = int(self.pixel_queue_ptr[c])
        if self.legacy_enqueue:
            # CIRKD's (ContrastiveSeg's) slot/pointer rule only; which keys arrive is decided in enqueue().
            if ptr + k >= size:
                self.pixel_queue[c, size - k :] = keys
                self.pixel_queue_ptr[c] = 0
            else:
                self.pixel_queue[c, ptr : ptr + k] = keys
                self.pixel_queue_ptr[c] = ptr + k
            return
        slots = (ptr + torch.arange(k, device=keys.device)) % size
        self.pixel_queue[c, slots] = keys
        self.pixel_queue_ptr[c] = (ptr + k) % size

    def _sample_memory(self, queue: torch.Tensor, per_class: int) -> torch.Tensor:
        """`(K * n, Dt)` entries: the same `n = min(per_class, size)` random slots of every class."""
        slots = torch.randperm(queue.shape[1], device=queue.device)[:per_class]
        return queue[:, slots].reshape(-1, queue.shape[2])

    def _similarity_kd(
        self, s_anchors: torch.Tensor, t_anchors: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        tau, tau_kd = self.contrast_temperature, self.kd_temperature
        log_ps = F.log_softmax(s_anchors @ memory.t() / (tau * tau_kd), dim=1)
        log_pt = F.log_softmax(t_anchors @ memory.t() / (tau * tau_kd), dim=1)
        return tau_kd**2 * (log_pt.exp() * (log_pt - log_ps)).sum() / s_anchors.shape[0]

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        name = type(self).__name__
        student = require_field(inputs, "student_embedding", name)
        teacher = require_field(inputs, "teacher_embedding", name)
        check_labels(inputs.labels, self.num_classes, self.ignore_index)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(
                student,
                teacher,
                name,
                "student_embedding",
                "teacher_embedding",
                self.student_channels,
                self.teacher_channels,
            )
            if inputs.labels.shape[0] != s.shape[0]:
                raise ValueError(
                    f"{name}: labels {tuple(inputs.labels.shape)} and student_embedding {tuple(s.shape)} "
                    f"differ in batch size"
                )
            s = F.normalize(self.project_head(s), p=2, dim=1)
            t = F.normalize(t, p=2, dim=1)
            labels = resize_labels_nearest(inputs.labels, s.shape[-2:])
            if self.training:
                # Before any early return: the gather inside is a collective every rank must join.
                self.enqueue(t, labels)
            valid = (labels != self.ignore_index).flatten()
            dim = s.shape[1]
            s_anchors = s.permute(0, 2, 3, 1).reshape(-1, dim)[valid]
            t_anchors = t.permute(0, 2, 3, 1).reshape(-1, dim)[valid]
            if s_anchors.shape[0] == 0:
                # Every position is ignored: zero, but attached to the graph so DDP sees the head used.
                zero = 0.0 * s.sum()
                return {"cirkd_pixel": zero, "cirkd_region": zero.clone()}
            pixel_memory = self._sample_memory(self.pixel_queue, self.pixel_samples_per_class)
            region_memory = self._sample_memory(self.region_queue, self.region_samples_per_class)
            pixel = self._similarity_kd(s_anchors, t_anchors, pixel_memory)
            region = self._similarity_kd(s_anchors, t_anchors, region_memory)
        return {"cirkd_pixel": self.pixel_weight * pixel, "cirkd_region": self.region_weight * region}

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"num_classes={self.num_classes}, pixel_memory_size={self.pixel_memory_size}, "
            f"region_memory_size={self.region_memory_size}, "
            f"pixel_samples_per_class={self.pixel_samples_per_class}, "
            f"region_samples_per_class={self.region_samples_per_class}, pixel_weight={self.pixel_weight}, "
            f"region_weight={self.region_weight}, legacy_enqueue={self.legacy_enqueue}"
        )


@register_term("cirkd_pair")
def _cirkd_pair_term(ctx: TermContext, **kwargs) -> CIRKDPairLoss:
    return CIRKDPairLoss(**kwargs)


@register_term("cirkd_memory")
def _cirkd_memory_term(ctx: TermContext, **kwargs) -> CIRKDMemoryLoss:
    # CIRKD's VOC scripts lower the memory weights to 0.01 (author, CIRKD issue #8).
    weight = 0.01 if ctx.dataset == "voc" else 0.1
    defaults = dict(pixel_weight=weight, region_weight=weight)
    return CIRKDMemoryLoss(ctx.student["embedding"], ctx.teacher["embedding"], ctx.num_labels, **{**defaults, **kwargs})


register_method("cirkd", ("ce", "kd", "cirkd_pair", "cirkd_memory"),
                summary="+ mini-batch pixel pairs + pixel/region memory contrast")
