"""ModernBERT at tp_size=2 (a module of its own: SGLang builds one parallel runtime per process,
so no tp 1 engine may be alive beside these): odd shapes with the GeGLU halves and the fused
q/k/v split consistently per rank (an FFN SGLang pads), and PEFT adapters per row."""

from __future__ import annotations

from test_modernbert import check_odd_shapes, check_peft_adapters_per_row


def test_odd_shapes_at_tp_2(tmp_path):
    check_odd_shapes(tmp_path, tp_size=2)


def test_peft_adapters_per_row_at_tp_2(tmp_path):
    check_peft_adapters_per_row(tmp_path, tp_size=2)
