"""The fine-tuning API's request bodies, hyperparameter defaults and OpenAI object shapes.

`POST /v1/fine_tuning/jobs` takes OpenAI's fields: `model` (the base model's id), `training_file`,
optional `validation_file`, `suffix` (<= 64 characters of letters, digits, `-` and `_`),
`seed`, `metadata` (<= 16 string pairs) and `method` = {"type": "supervised", "supervised":
{"hyperparameters": {...}}} (the deprecated top-level `hyperparameters` is accepted too, not
both). Each hyperparameter is a number or "auto":
- `n_epochs` (1-50): auto = 3.
- `batch_size` (1-256): auto = n / 16 examples, clamped to 1..8 (about 16 steps per epoch).
- `learning_rate_multiplier` (> 0, <= 10): the learning rate is it x 2e-4 (a common LoRA
  rate); auto = 1.
Extensions (top-level, our names): `lora_rank` (1-64, default 8), `lora_alpha` (default
2 x rank), `target_modules` (default q_proj, k_proj, v_proj, o_proj).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from loraplex.server.protocol import _Strict

BASE_LEARNING_RATE = 2e-4
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Auto = Literal["auto"]


class Hyperparameters(_Strict):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised = Field(default_factory=Supervised)


class JobCreate(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, Field(pattern=SUFFIX_PATTERN)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None  # fmt: skip
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI, still accepted
    integrations: list[Any] | None = None
    # extensions
    lora_rank: Annotated[int, Field(ge=1, le=64)] = 8
    lora_alpha: Annotated[float, Field(gt=0)] | None = None
    target_modules: Annotated[list[str], Field(min_length=1, max_length=7)] | None = None

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v):
        if v:
            raise ValueError("integrations are not supported")
        return v

    @model_validator(mode="after")
    def _one_hyperparameter_place(self):
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError("give hyperparameters in 'method' or at the top level, not both")
        return self

    def requested(self) -> Hyperparameters:
        if self.hyperparameters is not None:
            return self.hyperparameters
        return (self.method or Method()).supervised.hyperparameters


def resolve(hp: Hyperparameters, num_examples: int) -> dict:
    """The hyperparameters a job runs with ("auto" replaced)."""
    batch = hp.batch_size
    if batch == "auto":
        batch = max(1, min(8, num_examples // 16))
    return {
        "n_epochs": 3 if hp.n_epochs == "auto" else hp.n_epochs,
        "batch_size": batch,
        "learning_rate_multiplier": (
            1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        ),
    }


# -- OpenAI objects --------------------------------------------------------------------------


def file_object(row: dict) -> dict:
    return {
        "object": "file",
        "id": row["id"],
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(row: dict) -> dict:
    hp = row["hyperparameters"]
    public = {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "model": row["model"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": row["tenant"],
        "result_files": row["result_files"],
        "status": row["status"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "hyperparameters": public,
        "method": {"type": "supervised", "supervised": {"hyperparameters": public}},
        "trained_tokens": row["trained_tokens"],
        "error": row["error"],
        "seed": row["seed"],
        "estimated_finish": row["estimated_finish"],
        "integrations": [],
        "metadata": row["metadata"],
        "user_provided_suffix": row["suffix"],
        # extensions
        "lora": {k: hp[k] for k in ("lora_rank", "lora_alpha", "target_modules")},
    }


def event_object(row: dict) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": row["data"],
    }


def checkpoint_object(row: dict) -> dict:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": row["id"],
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": row["name"],
        "fine_tuning_job_id": row["job_id"],
        "step_number": row["step"],
        "metrics": row["metrics"],
    }


def page(objects: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": objects, "has_more": has_more}
