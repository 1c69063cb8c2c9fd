"""ModernBERT at tp_size=2 (a module of its own: SGLang builds one parallel runtime per process,
so no tp 1 engine may be alive beside these): odd shapes with the GeGLU halves and the fused
q/k/v split consistently per rank (an FFN SGLang pads), PEFT adapters per row, and MeZO -- the fused
Wqkv / Wi drawn whole and sliced per rank, LoRA's shared A moved on every copy."""

from __future__ import annotations

from test_modernbert import check_lora_mezo, check_mezo_classifier, check_odd_shapes, check_peft_adapters_per_row


def test_odd_shapes_at_tp_2(tmp_path):
    check_odd_shapes(tmp_path, tp_size=2)


def test_peft_adapters_per_row_at_tp_2(tmp_path):
    check_peft_adapters_per_row(tmp_path, tp_size=2)


def test_mezo_every_weight_at_tp_2(tmp_path):
    check_mezo_classifier(tmp_path, "all", tp_size=2)


def test_mezo_lora_with_its_own_head_at_tp_2(tmp_path):
    check_lora_mezo(tmp_path, tp_size=2)
