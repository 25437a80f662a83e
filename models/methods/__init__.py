"""Continual-learning methods by name: the project's method, its baselines and its ablations.

A method is a model family plus what it changes in the config (loss weights, model settings)
and whether each task trains on every task's data so far (`joint`: the joint references).
"""
import inspect
from dataclasses import dataclass, field

from models.losses import LossWeights
from models.methods.analytic import PrototypeHead, RidgeHead
from models.methods.base import ContinualModel
from models.methods.cmoe import CMoE
from models.methods.logistic import LogisticHead
from models.methods.regularized import EWC, Replay

FAMILIES = {"cmoe": CMoE, "ridge": RidgeHead, "prototype": PrototypeHead, "ewc": EWC, "replay": Replay,
            "logistic": LogisticHead}
GRADIENT_ONLY = {"kd": 0.0, "rel": 0.0, "align": 0.0}
COSINE = {"head": "cosine", "freeze_per_task": 0, "class_gaussians": 0}  # the baselines' gradient-trained head


@dataclass(frozen=True)
class Method:
    family: str
    description: str
    loss: dict = field(default_factory=dict)  # LossWeights fields forced by the method (what defines it;
    # a method's own strengths, such as loss.ewc or model.memory, stay settable)
    model: dict = field(default_factory=dict)  # ModelConfig fields forced by the method
    joint: bool = False


METHODS = {
    "cmoe": Method("cmoe", "cross-modal MoE adapter (alignment, load balancing, distillation, relations) trained "
                           "every task with rows drawn from earlier classes' Gaussians; analytic head over "
                           "[frozen features, adapter output]"),
    "finetune": Method("cmoe", "the same network trained with cross-entropy only", loss=GRADIENT_ONLY, model=COSINE),
    "joint": Method("cmoe", "joint reference: each task trains on every task's data so far", loss=GRADIENT_ONLY,
                    model=COSINE, joint=True),
    "cmoe-joint": Method("cmoe", "cmoe's joint reference: each task trains the adapter on every task's real rows so "
                                 "far and refits the analytic head on all of them; nothing that guards against "
                                 "forgetting (distillation, relations, expert freezing, class Gaussians)",
                         loss={"kd": 0.0, "rel": 0.0}, model={"class_gaussians": 0, "freeze_per_task": 0}, joint=True),
    "cmoe-joint-gaussians": Method("cmoe", "cmoe-joint with cmoe's class Gaussians: rows drawn from every earlier "
                                           "class's Gaussian (re-estimated on all its rows so far) join each batch",
                                   loss={"kd": 0.0, "rel": 0.0}, model={"freeze_per_task": 0}, joint=True),
    "joint-logistic": Method("logistic", "joint reference: multinomial logistic regression on the frozen features "
                                         "of every task's rows so far, fitted to convergence", joint=True),
    "lwf": Method("cmoe", "learning without forgetting: cross-entropy + logit distillation",
                  loss={"rel": 0.0, "align": 0.0}, model=COSINE),
    "ewc": Method("ewc", "elastic weight consolidation: cross-entropy + Fisher-weighted pull to earlier weights",
                  loss=GRADIENT_ONLY, model=COSINE),
    "replay": Method("replay", "cross-entropy on each batch joined by rows from a class-balanced buffer (memory)",
                     loss=GRADIENT_ONLY, model=COSINE),
    "moe-adapters": Method("cmoe", "per-task experts: two new experts each task, the used ones frozen after it; "
                           "no alignment or preservation", loss=GRADIENT_ONLY,
                           model={**COSINE, "experts_per_task": 2, "freeze_per_task": 1000}),
    "simplecil": Method("prototype", "class prototypes on the frozen features, cosine classifier"),
    "ranpac": Method("ridge", "random ReLU projection + ridge head on accumulated statistics"),
    "cmoe-no-align": Method("cmoe", "ablation: no alignment loss", loss={"align": 0.0}),
    "cmoe-no-rel": Method("cmoe", "ablation: no relation preservation", loss={"rel": 0.0}),
    "cmoe-no-freeze": Method("cmoe", "ablation: no expert freezing", model={"freeze_per_task": 0}),
    "cmoe-one-adapter": Method("cmoe", "ablation: one adapter instead of a mixture of experts",
                               model={"num_experts": 1, "top_k": 1, "freeze_per_task": 0}),
    "cmoe-cosine-head": Method("cmoe", "ablation: the paper's gradient-trained cosine head, adapter training all "
                                       "tasks, no class Gaussians", model={"head": "cosine", "class_gaussians": 0}),
    "cmoe-no-gaussians": Method("cmoe", "ablation: no class Gaussians; the adapter trains on the first task only",
                                model={"class_gaussians": 0, "adapt_tasks": 1}),
    "cmoe-adapt-all": Method("cmoe", "ablation: no class Gaussians; the adapter trains every task under statistics "
                                     "gathered by its earlier selves", model={"class_gaussians": 0}),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


def model_settings(family: str) -> set[str]:
    """The ModelConfig keys the family's constructor takes."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for c in FAMILIES[family].__mro__ if "__init__" in vars(c) and issubclass(c, ContinualModel)
            for name, p in inspect.signature(c.__init__).parameters.items() if p.kind in named} - {
        "self", "modality_dims", "num_classes"}


def settings_read(family: str) -> set[str]:
    """The `model.*` and `loss.*` config keys a family reads."""
    return {f"model.{k}" for k in model_settings(family)} | {f"loss.{k}" for k in FAMILIES[family].loss_terms}


def create_model(family: str, modality_dims: dict[str, int], num_classes: int, model_cfg: dict) -> ContinualModel:
    """The family's model, given the settings of `model_cfg` that it takes (the config refuses a
    setting the family does not read, so what is left out here is at its default)."""
    accepted = model_settings(family)
    return FAMILIES[family](modality_dims, num_classes, **{k: v for k, v in model_cfg.items() if k in accepted})


__all__ = ["METHODS", "ContinualModel", "LossWeights", "Method", "create_model", "get_method", "settings_read"]
