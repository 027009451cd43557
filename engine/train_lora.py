"""The adapter being trained: float32 master weights A [r, in] and B [out, r] per (layer, module),
as leaf tensors with gradients, and where they live.

The update of a module is `scale * (x @ A^T) @ B^T` (engine/train_forward.py). `place` moves the
weights, their gradients and AdamW's two moments into one float32 buffer (a job's state pages
in the unified pool: memory/train_pages.py), so a co-served job's state is inside the pool's
budget; the optimizer must be built after placing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraplex.engine.loader import MODULES, ModelSpec

PEFT_ORDER = MODULES  # also PEFT's module order in a layer (the order its init draws in)


@dataclass
class TrainableLoRA:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # in PEFT_ORDER
    A: dict[tuple[int, str], torch.Tensor]  # [rank, in] float32, requires_grad
    B: dict[tuple[int, str], torch.Tensor]  # [out, rank] float32, requires_grad

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def parameters(self) -> list[torch.Tensor]:
        """A then B of each module, layer by layer in PEFT_ORDER: PEFT's parameter order."""
        keys = sorted(self.A, key=lambda k: (k[0], PEFT_ORDER.index(k[1])))
        return [t for k in keys for t in (self.A[k], self.B[k])]

    def numel(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def place(self, buffer: torch.Tensor) -> dict:
        """Move the weights into `buffer` (float32, flat, >= 4 * numel() elements): weights,
        then gradients (zeroed, accumulated in place by autograd), then AdamW's exp_avg and
        exp_avg_sq (zeroed). Returns the optimizer state to give `torch.optim.AdamW` (its
        `state[param]`), which then uses those views instead of allocating its own."""
        n = self.numel()
        if buffer.dtype != torch.float32 or buffer.dim() != 1 or buffer.numel() < 4 * n:
            raise ValueError(f"need a flat float32 buffer of >= {4 * n} elements")
        storage, base = buffer.untyped_storage(), buffer.storage_offset()

        def alias(offset: int, shape) -> torch.Tensor:
            # Not a view of `buffer`: views share one version counter, so autograd would see
            # a weight it saved "modified" each time a gradient beside it accumulates.
            t = torch.empty(0, dtype=torch.float32, device=buffer.device)
            return t.set_(storage, base + offset, shape)

        state, offset = {}, 0
        for table in (self.A, self.B):
            for key in sorted(table, key=lambda k: (k[0], PEFT_ORDER.index(k[1]))):
                old = table[key]
                size, shape = old.numel(), old.shape
                w, g, m, v = (alias(i * n + offset, shape) for i in range(4))
                offset += size
                with torch.no_grad():
                    w.copy_(old)
                w.requires_grad_()
                w.grad = g.zero_()
                table[key] = w
                state[w] = {"step": torch.tensor(0.0), "exp_avg": m.zero_(),
                            "exp_avg_sq": v.zero_()}  # fmt: skip
        return state

    @classmethod
    def peft_init(
        cls,
        spec: ModelSpec,
        rank: int,
        alpha: float,
        target_modules,
        seed: int,
        use_rslora: bool = False,
        device: torch.device | str = "cpu",
    ) -> TrainableLoRA:
        """PEFT's default initialisation, draw for draw: with the global RNG seeded `seed`, each
        module (layers in order, modules in PEFT_ORDER) builds lora_A and lora_B as nn.Linear
        (each drawing its own kaiming-uniform init), then re-draws A (kaiming-uniform, a=sqrt 5)
        and zeroes B. The same seed gives PEFT's `get_peft_model` weights."""
        targets = tuple(m for m in PEFT_ORDER if m in set(target_modules))
        if len(targets) != len(set(target_modules)) or not targets:
            raise ValueError(f"target_modules must be a non-empty subset of {MODULES}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        # PEFT draws from the global RNG; fork it so a job starting in a serving engine does not
        # change what anything else in the process draws next.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            A, B = {}, {}
            for layer in range(spec.num_layers):
                for m in targets:
                    din, dout = spec.module_dims(m)
                    a, b = torch.empty(rank, din), torch.empty(dout, rank)
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(din, rank)
                    torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(rank, dout)
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters
                    b.zero_()
                    A[layer, m], B[layer, m] = a, b
        return cls._leaves(rank, alpha, use_rslora, targets, A, B, device)

    @classmethod
    def from_weights(cls, weights, device: torch.device | str = "cpu") -> TrainableLoRA:
        """From a loaded adapter (engine/adapter_loader.py `AdapterWeights`): its config and
        float32 copies of its A and B."""
        targets = tuple(m for m in PEFT_ORDER if m in weights.target_modules)
        return cls._leaves(
            weights.rank,
            weights.alpha,
            weights.use_rslora,
            targets,
            dict(weights.A),
            dict(weights.B),
            device,
        )

    @classmethod
    def _leaves(cls, rank, alpha, use_rslora, targets, A, B, device) -> TrainableLoRA:
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_()

        return cls(
            rank,
            float(alpha),
            bool(use_rslora),
            targets,
            {k: leaf(v) for k, v in A.items()},
            {k: leaf(v) for k, v in B.items()},
        )
