"""A classifier that also weighs how far a part is from the good parts the line made.

Trained with --unlabelled on data that has a good class: the unlabelled images the
classifier calls good become a memory bank of good patches (train/anomaly.py's scorer),
and a small linear layer (`head`) reads the classifier's logits and the logarithm of the
image's distance to that bank. On elpv's solar cells the distance separates cracked
cells the pooled features miss (docs/unlabelled.md). The whole model is one graph: it
exports, quantises and runs like any classifier, and its output is the class logits.

Two forms of the layer, chosen by cross-validation in training (train/unlabelled.py):
the stack (`split` False: the head weighs every logit and the distance) and the split
(`split` True: the distance alone says good or defective, the classifier only which
defect: `head` then reads the distance for the good class and nothing else, and the
defects' logits are the classifier's log-probabilities among the defects).
"""

from __future__ import annotations

import torch
from torch import nn

from .anomaly import AnomalyModel, empty_model
from .model import Classifier


def defect_log_softmax(logits: torch.Tensor, ok: int) -> torch.Tensor | None:
    """log p(class | defective) of the classifier's logits for the defect classes, 0 at the
    good class `ok`; None with one defect class (where it is 0 everywhere). No large
    constants (a mask of -1e4 would share a quantised tensor with the logits in INT8)."""
    if logits.shape[1] < 3:
        return None
    defects = torch.cat([logits[:, :ok], logits[:, ok + 1:]], 1)
    log_p = defects - torch.logsumexp(defects, 1, keepdim=True)
    return torch.cat([log_p[:, :ok], torch.zeros_like(logits[:, :1]), log_p[:, ok:]], 1)


class GoodPartsClassifier(nn.Module):
    """(N, 3, H, W) float RGB in 0..255 -> logits (N, classes) of
    head([classifier logits, log distance to the good parts]), plus, in the split form,
    the classifier's log-probabilities among the defect classes."""

    task = "classify"
    views = None      # the classifier inside averages its own test-time views

    def __init__(self, classifier: Classifier, scorer: AnomalyModel, ok: int, split: bool = False):
        super().__init__()
        self.classifier = classifier
        self.scorer = scorer
        self.ok = int(ok)
        self.split = bool(split)
        classes = classifier.head.out_features
        self.head = nn.Linear(classes + 1, classes)

    @property
    def stages(self) -> nn.ModuleList:
        return self.classifier.stages

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What `head` reads: the classifier's logits and the log of the distance."""
        score = self.scorer.score_and_map(x)[0]
        return torch.cat([self.classifier(x), torch.log(score.clamp_min(1e-6)).unsqueeze(1)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_logits(self.head, self.inputs(x), self.split, self.ok)


def layer_logits(head: nn.Linear, inputs: torch.Tensor, split: bool, ok: int) -> torch.Tensor:
    """The layer's logits from its inputs ([classifier logits, log distance])."""
    out = head(inputs)
    term = defect_log_softmax(inputs[:, :-1], ok) if split else None
    return out if term is None else out + term


def describe(model: GoodPartsClassifier) -> dict:
    """The checkpoint's entry for the good-parts scorer (its shape; the weights are in the
    state dict)."""
    return {"ok": model.ok, "split": model.split, **model.scorer.shape()}


def empty_scorer(entry, spec, shape: dict, classes: int) -> AnomalyModel:
    """The scorer a checkpoint entry (AnomalyModel.shape's fields and the good class "ok") describes,
    with empty buffers; ValueError when the entry is malformed."""
    ok = shape.get("ok") if isinstance(shape, dict) else None
    if not isinstance(ok, int) or not 0 <= ok < classes or not isinstance(shape.get("split", False), bool):
        raise ValueError("invalid scorer entry")
    return empty_model(entry.build().stages, spec, shape)


def rebuild(classifier: Classifier, entry, spec, good: dict) -> GoodPartsClassifier:
    """The empty model a checkpoint's `good_parts` entry describes (ValueError when it is
    malformed); its weights are loaded after."""
    scorer = empty_scorer(entry, spec, good, classifier.head.out_features)
    return GoodPartsClassifier(classifier, scorer, good["ok"], split=good.get("split", False))
