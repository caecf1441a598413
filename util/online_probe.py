"""An online linear probe during pre-training (`--online_probe`): is the representation any good, while it trains?

A BatchNorm (no affine) + linear classifier on the encoder's class token, trained alongside the MAE with its own
AdamW on detached features: its gradients never reach the encoder. The features are the class token of the
training forward itself (the encoder's output on the visible 25% of the patches), captured by a hook on the
encoder's final norm, so training the probe costs no extra encoder forward; the validation accuracy needs the
whole image and is measured with one encoder forward per validation batch (mask ratio 0) at each epoch's end.
Under DDP each process trains the same probe on its share (gradients averaged over the processes). Its weights
and optimizer go into every checkpoint ('online_probe') and come back with the run, so a resumed run's probe
continues exactly.
"""
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.distributed import all_reduce_sum_, get_world_size
from util.precision import autocast

STATE_KEY = "online_probe"


class OnlineProbe(nn.Module):
    """BatchNorm1d(D, affine=False) + Linear(D, num_classes) on detached class tokens."""

    def __init__(self, embed_dim: int, num_classes: int, lr: float = 1e-3):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # its initialisation leaves training's random stream untouched
            torch.manual_seed(0)
            self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        self.features: Optional[torch.Tensor] = None
        self._hook: Optional[Any] = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features.detach().float()))

    def attach(self, mae: nn.Module) -> "OnlineProbe":
        """Capture the class token of every encoder forward of `mae` (the unwrapped model)."""
        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.features = output[:, 0].detach()
        self._hook = mae.norm.register_forward_hook(keep)
        return self

    def train_step(self, labels: torch.Tensor) -> torch.Tensor:
        """One AdamW step on the features of the last encoder forward; returns its top-1 accuracy (a device
        tensor, in %)."""
        if self.features is None:
            raise RuntimeError("the online probe saw no encoder forward")
        self.train()
        features = self.features.float()
        finite = features.isfinite().all(dim=1)  # a non-finite sample (a NaN step) teaches the probe nothing
        logits = self(torch.where(finite[:, None], features, torch.zeros_like(features)))
        loss = (F.cross_entropy(logits, labels, reduction="none") * finite).sum() / finite.sum().clamp_min(1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if get_world_size() > 1:  # every process keeps the same probe
            for p in self.head.parameters():
                all_reduce_sum_(p.grad)
                p.grad.div_(get_world_size())
        self.optimizer.step()
        self.features = None
        return (logits.argmax(dim=1) == labels).float().mean() * 100

    @torch.no_grad()
    def evaluate(self, mae: nn.Module, loader: Iterable, device: torch.device, amp: str) -> float:
        """Top-1 accuracy (%) of the probe on `loader`'s whole images (one encoder forward each, nothing masked),
        over every process's share."""
        self.eval()
        was_training = mae.training
        mae.eval()
        correct = torch.zeros((), dtype=torch.float64, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            n, length = images.shape[0], mae.patch_embed.num_patches
            noise = torch.arange(length, device=device, dtype=torch.float32).expand(n, length)  # no random draws
            sharded = hasattr(mae, "unshard")  # --fsdp: the root's own weights are gathered by its forward only
            if sharded:
                mae.unshard()
            try:
                with autocast(device, amp):
                    latent = mae.forward_encoder(images, 0.0, noise=noise)[0]
            finally:
                if sharded:
                    mae.reshard()
            self.features = None
            predicted = self(latent[:, 0]).argmax(dim=1)
            correct += (predicted == labels).sum()
            total += labels.numel()
        mae.train(was_training)
        self.to(device)
        all_reduce_sum_(correct)
        all_reduce_sum_(total)
        return float(correct / total.clamp_min(1) * 100)

    def checkpoint_state(self) -> Dict[str, Any]:
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
