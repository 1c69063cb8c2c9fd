"""Heads as declarations: what sits on top of the shared encoder for each task, per family.

One :class:`Head` per transformers task class family (``*ForMaskedLM``, ``*ForSequenceClassification``,
``*ForTokenClassification``, ``*ForQuestionAnswering``, ``*Model``): transformers' class-name suffix,
which rows of a sequence it reads, and per family the modules it stacks (:class:`HeadShape`:
BERT's pooler, RoBERTa's dense + tanh, an output projection) and the checkpoint names of their
tensors. From this table the weight maps (:mod:`.weight_map`), the SGLang-side modules
(:mod:`.task_heads`), the load plan, the saver and the face classes follow. Pure tables: importing
this module imports neither SGLang nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

# The key the engine's private config carries to tell the SGLang-side model which head to build.
HEAD_CONFIG_KEY = "sglang_hf_bridge_head"


@dataclass(frozen=True)
class HeadShape:
    """The modules a head stacks on the encoder's output rows, in order, and the checkpoint names
    (as transformers' class writes them, base prefix excluded) of their tensors: ``pooler`` --
    BERT's pooler (dense + tanh, under the base model); ``dense`` -- RoBERTa's classification dense
    + tanh; ``output`` -- the final projection to ``outputs`` columns."""

    pooler: bool = False
    dense: Optional[str] = None  # module name of the dense layer (``classifier.dense``)
    output: Optional[str] = None  # module name of the output layer (``classifier.out_proj``)
    # After the dense: its activation ("tanh", or "config.<field>": the config names it) and a
    # LayerNorm (module name; ModernBERT's prediction head ``head.norm``).
    activation: str = "tanh"
    norm: Optional[str] = None


@dataclass(frozen=True)
class Head:
    """``reads``: the rows the head is applied to -- ``"selected"`` (rows the caller picks: the
    masks), ``"first"`` (each sequence's first token, ``<s>`` / ``[CLS]``), ``"all"`` (every token).
    ``outputs``: ``"vocab"`` (masked LM), ``"labels"`` (``config.num_labels``), or None (the pooler
    alone). ``new_when_missing``: a checkpoint without this head's tensors gets a new head
    initialised as transformers initialises it (how fine-tuning starts from a base checkpoint);
    False: missing tensors are refused."""

    name: str
    hf_suffix: str
    reads: str
    outputs: Optional[str]
    shapes: Mapping[str, HeadShape]  # family name -> the modules (masked LM: its own head module)
    new_when_missing: bool = True
    under_base: bool = True  # False: the class is the base model itself (names without base prefix)

    def shape(self, family: str) -> HeadShape:
        return self.shapes[family]

    def num_outputs(self, config) -> Optional[int]:
        if self.outputs == "labels":
            return int(config.num_labels)
        if self.outputs == "vocab":
            return int(config.vocab_size)
        return None


_CLASSIFIER = HeadShape(output="classifier")
# ModernBERT's every task head: its prediction head (dense -> the config's classifier activation
# -> norm), then ``classifier``.
_MODERNBERT_TASK = HeadShape(dense="head.dense", norm="head.norm", activation="config.classifier_activation",
                             output="classifier")
MASKED_LM = Head("masked_lm", "ForMaskedLM", "selected", "vocab",
                 {"roberta": HeadShape(), "bert": HeadShape(), "modernbert": HeadShape()}, new_when_missing=False)
SEQUENCE_CLASSIFICATION = Head(
    "sequence_classification", "ForSequenceClassification", "first", "labels",
    {"roberta": HeadShape(dense="classifier.dense", output="classifier.out_proj"),
     "bert": HeadShape(pooler=True, output="classifier"), "modernbert": _MODERNBERT_TASK})
TOKEN_CLASSIFICATION = Head("token_classification", "ForTokenClassification", "all", "labels",
                            {"roberta": _CLASSIFIER, "bert": _CLASSIFIER, "modernbert": _MODERNBERT_TASK})
QUESTION_ANSWERING = Head("question_answering", "ForQuestionAnswering", "all", "labels",
                          {"roberta": HeadShape(output="qa_outputs"), "bert": HeadShape(output="qa_outputs"),
                           "modernbert": _MODERNBERT_TASK})
BASE_MODEL = Head("base_model", "Model", "first", None,
                  {"roberta": HeadShape(pooler=True), "bert": HeadShape(pooler=True), "modernbert": HeadShape()},
                  under_base=False)

HEADS: Dict[str, Head] = {h.name: h for h in (MASKED_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION,
                                             QUESTION_ANSWERING, BASE_MODEL)}


def rows_read(head: Head, config) -> str:
    """The rows ``head`` reads for this config: a sequence head of a model whose config pools by
    the mean (ModernBERT's ``classifier_pooling="mean"``) reads ``"mean"`` -- the mean of each
    sequence's real tokens' states -- instead of the first token's."""
    if head.reads == "first" and head.outputs == "labels" and getattr(config, "classifier_pooling", "cls") == "mean":
        return "mean"
    return head.reads


def head_of(config) -> Head:
    """The head an engine config names (masked LM when it names none)."""
    return HEADS[getattr(config, HEAD_CONFIG_KEY, None) or MASKED_LM.name]


Row = Tuple[str, str, Optional[str]]
POOLER_ROWS: List[Row] = [("pooler.dense.weight", "pooler.dense.weight", None),
                          ("pooler.dense.bias", "pooler.dense.bias", None)]


def task_head_rows(shape: HeadShape) -> List[Row]:
    """Checkpoint name -> engine name rows of a task head (the masked LM's are the weight map's).
    Engine names: ``pooler.dense.*``, ``head.dense.*``, ``head.output.*``."""
    rows: List[Row] = list(POOLER_ROWS) if shape.pooler else []
    for module, engine in ((shape.dense, "head.dense"), (shape.norm, "head.norm"), (shape.output, "head.output")):
        if module is not None:
            rows += [(f"{module}.weight", f"{engine}.weight", None), (f"{module}.bias", f"{engine}.bias", None)]
    return rows


def top_level_prefixes(shape: HeadShape) -> Tuple[str, ...]:
    """Names the task class writes outside the base model (``classifier.``, ``qa_outputs.``)."""
    return tuple(dict.fromkeys(f"{m.split('.')[0]}." for m in (shape.dense, shape.norm, shape.output) if m))
