"""Entry point of a tensor-parallel worker process:
``python -m sglang_hf_bridge.engine.tp_worker HOST:PORT RANK [--local]``.

Rank 0 starts its own node's workers with ``--local`` (key and spawn token on stdin). On another
node, start one per rank by hand (a follower), with the shared key (hex) on the first line of
stdin, or in ``SGLANG_HF_BRIDGE_TP_AUTHKEY`` (read once; see docs/tensor-parallel.md).
"""

from sglang_hf_bridge.engine.workers import worker_entry

if __name__ == "__main__":
    worker_entry()
