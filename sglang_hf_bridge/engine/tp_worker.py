"""Entry point of a tensor-parallel worker process (``python -m sglang_hf_bridge.engine.tp_worker``)."""

from sglang_hf_bridge.engine.workers import worker_entry

if __name__ == "__main__":
    worker_entry()
